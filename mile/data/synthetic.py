"""A seeded synthetic language whose true next-token distributions are known (data.source="synthetic").

Why: on natural text nobody knows how much of a model's loss is irreducible, so "MiLe helps rare,
hard tokens" cannot be measured, only guessed. Here every position's true conditional
distribution is known, so a model's *excess* loss (its CE minus the true conditional entropy, the
KL to the truth) is measured exactly, per token-frequency bucket and per kind of context.

The language is a first-order Markov chain over ``vocab_size`` ids. Ids 0..3 are reserved as in
the SentencePiece tokenizer (unk, bos, eos, pad); ids 4.. are the ``n = vocab_size - 4``
language types, id ``4 + r`` being the type of design rank ``r``. Design:

* **Zipfian unigrams.** Type ``r`` has weight ``pi_r ∝ (r + 1)^-zipf_exponent``. Documents start
  by drawing from ``pi`` (the row of EOS), flat contexts draw from ``pi`` with noise, and the
  continuations of the other contexts are drawn once, at construction, by
  ``pi^target_exponent``; the chain's stationary unigram distribution is Zipf-like (with the
  default spec a log-log fit gives an exponent of about 1.36 and the rarest types a share of
  about 1e-5; ``zipf_fit`` and the experiment report give the exact figures).
* **Three kinds of context.** Each type, as a context, is one of
  - *deterministic*: a single continuation (true entropy 0.03 nats, from EOS alone);
  - *multi-label*: 2..``max_labels`` valid continuations with probabilities ``1/(2k) + Dirichlet(1)/2``
    (the paper's "I like playing ___"; entropy 0.6..1.8 nats);
  - *flat*: every type, with probability ``∝ pi * lognormal(0, flat_noise)`` (entropy 2..6 nats).
  Kinds are assigned in blocks of 20 consecutive ranks with the shares ``kind_shares``, so
  frequent and rare types alike are contexts of every kind; continuations are drawn
  regardless of the context's rank and with a flattened ``pi``, so rare types are targets of
  every kind of context (with the default spec about 5 % / 23 % / 71 % of rare-bucket tokens
  follow deterministic / multi-label / flat contexts: a rare type cannot be the only
  continuation of a frequent context and stay rare).
* **Documents** end when the chain emits EOS, with probability ``eos_prob`` from every context
  (so lengths are geometric and EOS is itself a token with a known probability); the pipeline's
  EOS separator is exactly that emission. A deterministic context never points at another
  deterministic one, so the chain cannot lock into a cycle.

Why it exercises the paper's argument: focal's weight ``(1 - p_t)^gamma`` depends on the target,
so in any context with unequal continuations (multi-label ones, and here even deterministic
ones through their small EOS probability) it keeps pushing probability towards the less likely
continuations even when the model is exactly right: its fixed point is ``q ∝ p (1 - q)^gamma``;
MiLe's weight ``(sigma + H)^gamma`` depends only on the context, so within a context its optimum
is still the true distribution and it can only move capacity *between* contexts: towards flat and
multi-label ones, away from deterministic ones.

Tokens are the ids: documents are stored as ids in a token store (``mile.data.store``), read by
the same pipeline as a pretokenized corpus, and ``IdTokenizer`` maps text of space-separated
decimal ids to ids (for evaluation prompts), so no SentencePiece model is trained. Everything is generated from the config (nothing is
downloaded) and cached under ``<cache_dir>/synthetic/<key>/``: ``language.npz`` holds the
transition table, each type's kind, the stationary distribution and, for every held-out
position, the true entropy of its context and the true log-probability of its target.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from mile import atomic
from mile.data.config import DataConfig

RESERVED = 4  # unk, bos, eos, pad: the ids the SentencePiece tokenizer reserves
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3
KINDS = ("deterministic", "multi-label", "flat")
_VERSION = "markov1-v3"  # bump when the construction changes, so caches are rebuilt
_BLOCK = 20  # ranks per block of the stratified kind assignment


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """The generator's parameters: ``data.vocab_size``, ``data.validation_every``, ``data.synthetic.*``."""

    vocab_size: int = 2048
    validation_every: int = 20
    seed: int = 0
    train_tokens: int = 2_000_000
    zipf_exponent: float = 1.0
    eos_prob: float = 0.005
    kind_shares: tuple[float, float, float] = (0.4, 0.35, 0.25)
    max_labels: int = 6
    target_exponent: float = 0.5
    flat_noise: float = 1.0

    @classmethod
    def from_config(cls, data_cfg: Any) -> "SyntheticSpec":
        """From a ``mile.data.DataConfig`` (or the ``data`` ConfigDict/dict it is read from)."""
        cfg = DataConfig.from_cfg(data_cfg)
        syn = cfg.synthetic or {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "validation_every"}
        unknown = sorted(set(syn) - fields)
        if unknown:
            raise ValueError(f"unknown data.synthetic keys {unknown}; the generator takes {sorted(fields)}.")
        kwargs = {k: syn[k] for k in fields if syn.get(k) is not None}
        if "kind_shares" in kwargs:
            shares = kwargs["kind_shares"]
            if isinstance(shares, str):  # a command-line "0.4,0.35,0.25"
                shares = [s for s in shares.split(",") if s.strip()]
            kwargs["kind_shares"] = tuple(float(s) for s in shares)
        spec = cls(vocab_size=cfg.vocab_size, validation_every=cfg.validation_every, **kwargs)
        spec.check()
        return spec

    def check(self) -> None:
        if self.vocab_size < RESERVED + 2 * _BLOCK:
            raise ValueError(
                f"data.vocab_size={self.vocab_size} is too small for a synthetic language; use >= {RESERVED + 2 * _BLOCK} (e.g. 2048)."
            )
        if not 0.0 < self.eos_prob < 0.5:
            raise ValueError(f"data.synthetic.eos_prob={self.eos_prob} must be in (0, 0.5); e.g. 0.005.")
        shares = self.kind_shares
        if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(
                f"data.synthetic.kind_shares={shares} must be 3 non-negative shares (deterministic, multi-label, flat) summing to 1."
            )
        if not 2 <= self.max_labels <= _BLOCK:
            raise ValueError(f"data.synthetic.max_labels={self.max_labels} must be in [2, {_BLOCK}].")
        if self.train_tokens < 1000:
            raise ValueError(f"data.synthetic.train_tokens={self.train_tokens} must be >= 1000.")
        if self.zipf_exponent < 0 or self.flat_noise < 0 or self.target_exponent < 0:
            raise ValueError("data.synthetic.zipf_exponent, target_exponent and flat_noise must be >= 0.")

    def key(self) -> str:
        text = json.dumps({"version": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The language.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Language:
    """``probs[c, y]``: true P(next = y | previous = c), float64 [V, V], rows sum to 1.
    ``kind[c]``: index into KINDS of context c. ``stationary``: the chain's unigram distribution."""

    probs: np.ndarray
    kind: np.ndarray
    stationary: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.probs.shape[0]

    def entropy(self) -> np.ndarray:
        """float64 [V]: the true entropy (nats) of each context's next-token distribution."""
        p = self.probs
        return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)

    def log_probs(self) -> np.ndarray:
        """float64 [V, V]: log P(y | c), -inf where impossible."""
        with np.errstate(divide="ignore"):
            return np.log(self.probs)


def build_language(spec: SyntheticSpec) -> Language:
    """The transition table of the language described in the module docstring (deterministic in spec)."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    V, n = spec.vocab_size, spec.vocab_size - RESERVED
    pi = (np.arange(n) + 1.0) ** -spec.zipf_exponent
    pi /= pi.sum()

    # Kinds by rank, stratified: each block of 20 ranks gets the shares (largest remainder).
    counts = np.floor(np.asarray(spec.kind_shares) * _BLOCK).astype(int)
    for i in np.argsort(-(np.asarray(spec.kind_shares) * _BLOCK - counts))[: _BLOCK - counts.sum()]:
        counts[i] += 1
    pattern = np.repeat(np.arange(3), counts)
    kind_of_rank = np.concatenate([rng.permutation(pattern) for _ in range(-(-n // _BLOCK))])[:n]
    not_deterministic = np.flatnonzero(kind_of_rank != 0)
    if not_deterministic.size == 0:
        raise ValueError(
            "data.synthetic.kind_shares gives every context one continuation; give multi-label or flat a share."
        )

    body = np.zeros((n, n))  # next-type distribution of each context type, before EOS
    # Continuations are drawn by a flattened pi, so that rare types follow deterministic and
    # multi-label contexts too, not almost only flat ones.
    draw = pi**spec.target_exponent
    det_draw = draw[not_deterministic] / draw[not_deterministic].sum()
    draw /= draw.sum()
    for r in range(n):
        kind = kind_of_rank[r]
        if kind == 0:  # deterministic: one continuation
            body[r, rng.choice(not_deterministic, p=det_draw)] = 1.0
        elif kind == 1:  # multi-label: k distinct continuations
            k = int(rng.integers(2, spec.max_labels + 1))
            targets = rng.choice(n, size=k, replace=False, p=draw)
            body[r, targets] = 0.5 / k + 0.5 * rng.dirichlet(np.ones(k))
        else:  # flat: every type, Zipf-weighted with noise
            w = pi * np.exp(spec.flat_noise * rng.standard_normal(n))
            body[r] = w / w.sum()

    probs = np.zeros((V, V))
    probs[RESERVED:, RESERVED:] = (1.0 - spec.eos_prob) * body
    probs[RESERVED:, EOS_ID] = spec.eos_prob
    probs[EOS_ID, RESERVED:] = pi  # a document's first token
    for c in range(RESERVED):  # unk, bos, pad never occur as contexts; keep their rows valid
        if c != EOS_ID:
            probs[c, RESERVED:] = 1.0 / n
    kind = np.full(V, 2, np.int32)  # reserved rows count as flat
    kind[RESERVED:] = kind_of_rank
    return Language(probs=probs, kind=kind, stationary=_stationary(probs))


def _stationary(probs: np.ndarray, iterations: int = 2000, tol: float = 1e-13) -> np.ndarray:
    mu = np.full(probs.shape[0], 1.0 / probs.shape[0])
    for _ in range(iterations):
        nxt = mu @ probs
        if np.abs(nxt - mu).sum() < tol:
            return nxt
        mu = nxt
    return mu


def zipf_fit(unigram: np.ndarray) -> float:
    """The exponent s of a least-squares fit log p = a - s log rank over the types with p > 0."""
    p = np.sort(unigram[unigram > 0])[::-1]
    ranks = np.arange(1, len(p) + 1)
    slope = np.polyfit(np.log(ranks), np.log(p), 1)[0]
    return float(-slope)


def sample_documents(language: Language, num_tokens: int, seed: int, chains: int = 2000) -> list[np.ndarray]:
    """Documents (int32 ids, without the final EOS) of at least ``num_tokens`` tokens in all,
    counting each document's EOS. ``chains`` chains run side by side from a document start.
    Once there are enough tokens no chain starts a new document, but every started one is
    finished: dropping unfinished ones would favour short documents and bias the end of each
    chain towards EOS."""
    rng = np.random.default_rng([seed, 0xD0C])
    V = language.vocab_size
    cdf = np.cumsum(language.probs, axis=1)
    cdf /= cdf[:, -1:]  # exactly 1.0 from each row's last possible type on: never a 0-prob pick
    flat_cdf = (cdf + np.arange(V)[:, None]).ravel()  # one sorted array: row c lives in [c, c + 1]
    docs: list[np.ndarray] = []
    total = 0
    current: list[list[int]] = [[] for _ in range(chains)]
    context = np.full(chains, EOS_ID)
    active = np.arange(chains)
    while active.size:
        u = rng.random(active.size)
        nxt = np.searchsorted(flat_cdf, context[active] + u, side="right") - context[active] * V
        ended = []
        for i, token in zip(active, nxt):
            if token == EOS_ID:
                docs.append(np.asarray(current[i], np.int32))
                total += len(current[i]) + 1
                current[i] = []
                ended.append(i)
            else:
                current[i].append(int(token))
        context[active] = nxt
        if total >= num_tokens and ended:
            active = np.setdiff1d(active, ended)
    return docs


def heldout_stream(docs: Sequence[np.ndarray]) -> np.ndarray:
    """The token stream the evaluation pipeline reads: each document followed by EOS."""
    parts = []
    for d in docs:
        parts += [np.asarray(d, np.int32), np.array([EOS_ID], np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def position_truth(language: Language, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true entropy of the context, true log-probability of the token) at every stream position;
    position 0 (a document start) has the context EOS."""
    context = np.concatenate([[EOS_ID], stream[:-1]])
    with np.errstate(divide="ignore"):
        logp = np.log(language.probs[context, stream])
    return language.entropy()[context], logp


# ---------------------------------------------------------------------------------------------
# Ids as text, and the tokenizer that reads them back.
# ---------------------------------------------------------------------------------------------


def ids_to_text(ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


@dataclasses.dataclass(frozen=True)
class IdTokenizer:
    """The tokenizer of a language whose tokens are already ids: ``"17 5 301"`` <-> ``[17, 5, 301]``.

    It has the parts of ``mile.data.Tokenizer`` the pipeline and the evaluator use. ``path`` is
    the language file, so a cache keyed on the tokenizer's bytes changes with the language.
    """

    path: pathlib.Path
    size: int
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    @property
    def vocab_size(self) -> int:
        return self.size

    kind = "ids"

    @property
    def fingerprint(self) -> str:
        # The ids are the tokens: only the size of the id space can differ.
        return f"ids-{self.size}"

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        if not isinstance(text, str):
            return [self.encode(t) for t in text]
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise ValueError(
                f"synthetic text must be space-separated token ids, got {text[:40]!r}; encode it with ids_to_text."
            ) from None
        if ids and not 0 <= min(ids) <= max(ids) < self.size:
            raise ValueError(f"token id out of range [0, {self.size}) in {text[:40]!r}.")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return ids_to_text(ids)


# ---------------------------------------------------------------------------------------------
# The dataset on disk.
# ---------------------------------------------------------------------------------------------


def load_language(path: str | os.PathLike) -> tuple[Language, dict[str, np.ndarray]]:
    """(language, held-out records) from a ``language.npz`` written by ``prepare``."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    language = Language(probs=data.pop("probs"), kind=data.pop("kind"), stationary=data.pop("stationary"))
    return language, data


def prepare(data_cfg: Any, cache_dir: pathlib.Path) -> tuple[IdTokenizer, pathlib.Path]:
    """Generates (once) the language and its documents; returns (its tokenizer, the token store).

    The store (``mile.data.store``, kind "tokens") holds every document's ids in order; the
    train/validation split is the usual held-out view over it (``mile.data.build.HeldOut``).
    """
    from mile.data import store

    spec = SyntheticSpec.from_config(data_cfg)
    root = pathlib.Path(cache_dir) / "synthetic" / spec.key()
    language_path = root / "language.npz"
    store_dir = root / "store"
    if not (language_path.is_file() and store.is_complete(store_dir)):
        language = build_language(spec)
        # The split rule holds out every validation_every-th document; generate enough that
        # the training split has about train_tokens tokens.
        total = int(spec.train_tokens * spec.validation_every / (spec.validation_every - 1))
        docs = sample_documents(language, total, spec.seed)
        heldout = [d for i, d in enumerate(docs) if (i + 1) % spec.validation_every == 0]
        dtype = store.token_dtype(spec.vocab_size)
        store.build(
            store_dir,
            [store.Unit(0, functools.partial(_write_documents, docs, dtype))],
            kind="tokens",
            dtype=dtype,
            meta={"synthetic": dataclasses.asdict(spec)},
        )
        entropy, logp = position_truth(language, heldout_stream(heldout))
        root.mkdir(parents=True, exist_ok=True)
        # Last: a present language.npz means a complete dataset.
        with atomic.replacing(language_path) as tmp:
            np.savez(
                tmp,
                probs=language.probs,
                kind=language.kind,
                stationary=language.stationary,
                heldout_entropy=entropy,
                heldout_logp=logp,
                spec=np.asarray(json.dumps(dataclasses.asdict(spec))),
            )
    return IdTokenizer(path=language_path, size=spec.vocab_size), store_dir


def _write_documents(docs: Sequence[Sequence[int]], dtype, directory: pathlib.Path, index: int) -> dict:
    from mile.data import build, store

    writer = store.ShardWriter(directory, build.DOCS, index)
    for doc in docs:
        writer.write(store.encode_record(doc, dtype))
    return {"unit": index, "shards": {build.DOCS: writer.close()}, "counts": {"documents": len(docs)}}
