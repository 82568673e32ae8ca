"""mile as an lm-evaluation-harness model: score and generate with a mile checkpoint in JAX.

    python -m mile.lm_eval --model mile --model_args workdir=W[,step=N] --batch_size 16 \\
        --tasks hellaswag,piqa --num_fewshot 5 [--include_path my_tasks/] ...

The pinned harness (lm-eval 0.4.13, requirements-eval.txt) has no runtime plugin registration
for model backends, so this module registers ``mile`` in the harness's model registry and then
runs the harness's own command line with the same arguments: every harness flag works.

The harness builds the prompts, draws the few-shot examples and computes the metrics; this
backend only answers its three request types on whatever devices the process has:
* ``loglikelihood``: (context, continuation) -> (summed log p of the continuation, greedy?).
  Requests are split into tokens by ``mile.conditioning`` (one EOS in front: the rule every
  mile route shares), sorted by length, and scored ``batch_size`` rows at a time, padded to a
  power-of-two length (at least 16, at most max_seq_len): a handful of compilations.
* ``loglikelihood_rolling``: a whole text in max_seq_len windows (the harness's window rule),
  its first token predicted from the EOS.
* ``generate_until``: greedy KV-cache generation (``mile.generate``) cut at the first stop string.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lm_eval.models  # noqa: F401  the built-in backends first: the registry loads them only when empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from mile.conditioning import encode_document
from mile.generate import greedy_generate

_MIN_LEN = 16


def _bucket_len(n: int, cap: int) -> int:
    return min(cap, max(_MIN_LEN, 1 << (n - 1).bit_length()))


def make_scorer(model):
    """(inputs int[B,S], targets int[B,S]) -> (log p(target) float32[B,S], target is argmax bool[B,S])."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, inputs, targets):
        m = nnx.merge(graphdef, state)
        head = m.unembedding().astype(jnp.float32)

        def row(args):  # one row's logits at a time: [S, V], never [B, S, V]
            hidden, target = args
            logits = hidden.astype(jnp.float32) @ head
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
            return picked, jnp.argmax(logits, axis=-1) == target

        return jax.lax.map(row, (m(inputs), targets))

    def run(inputs, targets):
        logp, greedy = score(state, np.asarray(inputs, np.int32), np.asarray(targets, np.int32))
        return np.asarray(logp, np.float64), np.asarray(greedy)

    return run


@register_model("mile")
class MileLM(TemplateLM):
    """A mile model and its SentencePiece tokenizer behind the harness's LM interface."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        tokenizer: str | None = None,
        *,
        model=None,
        device: str | None = None,  # the harness passes these two; JAX picks the devices itself
        max_batch_size: int | None = None,
        **unknown,
    ):
        super().__init__()
        from mile.data.tokenizer import Tokenizer

        if unknown:
            raise ValueError(
                f"unknown --model_args {', '.join(sorted(unknown))} for --model mile; "
                "use workdir, step, max_gen_toks, tokenizer."
            )

        if model is None:
            if workdir is None:
                raise ValueError("--model mile needs --model_args workdir=<trained workdir>[,step=N].")
            from mile.restore import load_trained_model, trained_data

            model, cfg, step = load_trained_model(workdir, step=None if step is None else int(step))
            if tokenizer is None:

                tokenizer = trained_data(cfg).tokenizer  # cached: trained with the run
        if isinstance(tokenizer, str):
            tokenizer = Tokenizer.load(tokenizer)
        if tokenizer is None:
            raise ValueError("MileLM(model=...) needs tokenizer= (a Tokenizer, sp.model or tokenizer.json).")
        if str(batch_size).startswith("auto"):
            batch_size = 16  # the harness's "auto" probes torch memory; a fixed batch compiles once
        self.model, self.tok, self.step = model, tokenizer, step
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._score = make_scorer(model)

    # ---- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # The conditioning rule: a request's text starts a document, so EOS goes in front.
        if add_special_tokens is False:
            return self.tok.encode(string)
        return encode_document(self.tok, string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    # ---- scoring
    def _score_token_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log p, all greedy) of each (context ids, continuation ids), longest first."""
        cap = self.max_length
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a continuation encodes to no tokens; give a non-empty continuation.")
            ids = (list(ctx) + list(cont))[-(cap + 1) :]  # cut long contexts from the left
            rows.append((ids, min(len(cont), len(ids) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        b = self.batch_size
        for start in range(0, len(order), b):
            chunk = order[start : start + b]
            seq = _bucket_len(len(rows[chunk[0]][0]) - 1, cap)
            inputs = np.zeros((b, seq), np.int32)  # padding rows and columns are never read back
            targets = np.zeros((b, seq), np.int32)
            for r, i in enumerate(chunk):
                ids = rows[i][0]
                inputs[r, : len(ids) - 1], targets[r, : len(ids) - 1] = ids[:-1], ids[1:]
            logp, greedy = self._score(inputs, targets)
            for r, i in enumerate(chunk):
                ids, n_cont = rows[i]
                cut = slice(len(ids) - 1 - n_cont, len(ids) - 1)
                out[i] = (float(logp[r, cut].sum()), bool(greedy[r, cut].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score_token_pairs([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok.encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score_token_pairs(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Group by generation settings so each group is one run of batches.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for i, text in zip(indices, self._generate([requests[i].args[0] for i in indices], kwargs)):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: Sequence[str], kwargs: dict) -> list[str]:
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError(
                "mile's backend generates greedily only; drop do_sample/temperature from the task."
            )
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok.decode([self.eot_token_id])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        room = self.max_length - max_new
        encoded = [encode_document(self.tok, c)[-room:] for c in contexts]
        stops = [s for s in until if s]
        eos, pad = self.tok.eos_id, self.tok.eos_id

        def stop(ids):
            return ids[-1] == eos or any(s in self.tok.decode(ids) for s in stops)

        texts = []
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        gens: list[list[int]] = [[] for _ in encoded]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            prompts = [encoded[i] for i in chunk]
            prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # one batch shape
            for i, ids in zip(
                chunk, greedy_generate(self.model, prompts, max_new_tokens=max_new, stop_ids=stop, pad_id=pad)
            ):
                gens[i] = ids
        for ids in gens:
            text = self.tok.decode([t for t in ids if t != eos])
            for s in stops:
                text = text.split(s)[0]
            texts.append(text)
        return texts


# A harness task over a mile multiple-choice file ({"context", "choices", "gold"} per line), read
# from disk with the datasets "json" loader: nothing reaches a hub. The choices carry their own
# leading space, so the target delimiter is empty and acc_norm divides by the same characters.
_MC_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_mc_task(directory, name: str, data_file) -> pathlib.Path:
    """Writes ``<directory>/<name>.yaml``, a local harness task over a mile MC JSONL file; pass
    the directory to the harness as ``--include_path``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(
        _MC_TASK_YAML.format(name=name, data_file=json.dumps(str(pathlib.Path(data_file).resolve())))
    )
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's own CLI, with ``mile`` registered (this module's import did that)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
