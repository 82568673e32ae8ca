"""mile.export: HF LlamaForCausalLM built from the export gives mile's logits; the HF tokenizer encodes
exactly as mile's (SentencePiece and tokenizer.json kinds); CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export tests need torch (requirements-dev.txt)")
transformers = pytest.importorskip(
    "transformers", reason="export tests need transformers (requirements-dev.txt)"
)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from mile import export  # noqa: E402
from mile.data import tokenizer as mtok  # noqa: E402
from tokenizer_helpers import train_hf_tokenizer  # noqa: E402
from mile.model import Llama  # noqa: E402
from model_helpers import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_VOCAB = 320
MODEL_VOCAB = 352  # larger than the tokenizer, as model.vocab_size may be padded


WORDS = (
    "in the beginning god created heaven and earth light darkness waters "
    "firmament evening morning day night seed fruit tree 1 2 3 Ünïcödé, naïve!"
).split()


def _docs(seed=0, n=200):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=40)).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # The same trainer (options, special ids) as training runs use.
    return mtok.train_or_load(
        _docs(),
        corpus_fingerprint="export-test",
        vocab_size=TOKENIZER_VOCAB,
        cache_dir=tmp_path_factory.mktemp("tok"),
    )


def _code_like_docs(n=400, seed=5):
    """Indented, code-like lines over 500 made-up words (Zipf-distributed): many merges, runs of
    spaces, digits and punctuation, for a larger SentencePiece model than the fixture's."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyzéü")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(500)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    symbols = ["=", "==", "(", ")", ":", ",", ".", "_", "__", "#", "+=", "->", "123", "4.5", "\t"]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.integers(3, 12)):
            tokens = list(rng.choice(words, size=rng.integers(1, 8), p=weights / weights.sum()))
            tokens += list(rng.choice(symbols, size=rng.integers(0, 4)))
            rng.shuffle(tokens)
            lines.append(" " * int(rng.choice([0, 0, 2, 4, 8, 12])) + " ".join(tokens))
        docs.append("\n".join(lines))
    return docs


def _train_hf_tokenizer(style, path):
    lines = _docs(seed=3, n=300) + ["def f(x):\n\treturn x * 2  # twice", "Naïve Ünïcödé  12345 6.78"]
    return train_hf_tokenizer(style, path, lines, TOKENIZER_VOCAB)


@pytest.fixture(scope="module")
def tokenizers_by_kind(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("hf_tok")
    return {
        "sentencepiece": tokenizer,
        "sentencepiece-1k": mtok.train_or_load(
            _code_like_docs(), corpus_fingerprint="export-code", vocab_size=1000, cache_dir=tmp / "sp1k"
        ),
        "metaspace": _train_hf_tokenizer("metaspace", tmp / "metaspace" / "tokenizer.json"),
        "bytelevel": _train_hf_tokenizer("bytelevel", tmp / "bytelevel" / "tokenizer.json"),
    }


def _model_cfg(scan_layers):
    # init_std 0.3 so logits spread widely (std ~1-2) and the comparison means something.
    return tiny_model_config(
        vocab_size=MODEL_VOCAB, mlp_dim=64, max_seq_len=32, init_std=0.3, scan_layers=scan_layers
    )


def _special_ids(tok):
    """(bos, eos, pad) the export should declare: begin-of-text is EOS (mile.conditioning)."""
    pad = tok.pad_id if tok.pad_id >= 0 else None
    return tok.eos_id, tok.eos_id, pad


@pytest.mark.parametrize(
    "kind,scan_layers",
    [("sentencepiece", False), ("sentencepiece", True), ("metaspace", False), ("bytelevel", True)],
)
def test_hf_logits_match(tmp_path, tokenizers_by_kind, kind, scan_layers):
    tok = tokenizers_by_kind[kind]
    cfg = ConfigDict({"model": _model_cfg(scan_layers)})
    model = Llama(cfg.model, rngs=nnx.Rngs(0))
    out = export.export_hf(model, cfg, tok.path, tmp_path / "hf")

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    assert (hf_cfg["num_key_value_heads"], hf_cfg["vocab_size"]) == (2, MODEL_VOCAB)
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == _special_ids(tok)
    if kind == "sentencepiece":
        assert _special_ids(tok) == (2, 2, 3)
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    gen_ids = (gen_cfg["bos_token_id"], gen_cfg["eos_token_id"], gen_cfg.get("pad_token_id"))
    assert gen_ids == _special_ids(tok)

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.dtype == torch.float32
    tokens = np.random.default_rng(1).integers(0, MODEL_VOCAB, size=(3, 32))
    want = np.asarray(model.logits(jnp.asarray(tokens, jnp.int32)))
    with torch.no_grad():
        got = hf(torch.tensor(tokens)).logits.numpy()
    assert want.std() > 0.5, "logits too close to 0 for a meaningful check"
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{kind} scan_layers={scan_layers}: max relative logit difference {rel:.2e}")
    assert rel < 1e-4


# Texts where a converted tokenizer most easily differs from SentencePiece or the tokenizer.json.
FIXED_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    " the earth",  # SentencePiece adds its dummy "▁" before a leading space too
    "  two spaces",
    "trailing space ",
    "trailing spaces   ",
    "several    consecutive     spaces",
    " ",
    "   ",
    "12345 6.78",
    "Day 123,  night\n\ntree   fruit",
    "line one\nline two\n",
    "\ttab\tseparated\t",
    "\n leading newline",
    "Naïve Ünïcödé",
    "☃ 漢字 🎉",  # outside the vocabulary: byte fallback (SentencePiece) or <unk>
    "Naïve Ünïcödé ☃ 漢字 (byte fallback)",
    "</s> and <s>, <pad>, <unk> as plain text",
    "",
]
ALPHABET = list("abcdefgh tuvwxyz THE 0123456789 .,;:!?'\"()-_/\\<>") + [
    " ", "  ", "\n", "\t", "é", "ï", "Ü", "ß", "☃", "漢", "字", "🎉",
    "the ", " earth", "ing", "</s>", "<0x41>",
]  # fmt: skip


def _random_texts(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, size=rng.integers(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-1k", "metaspace", "bytelevel"])
def test_hf_tokenizer_matches(tmp_path, tokenizers_by_kind, kind):
    tok = tokenizers_by_kind[kind]
    cfg = _model_cfg(False)
    cfg.vocab_size = max(MODEL_VOCAB, tok.vocab_size)
    out = export.export_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tok.path, tmp_path / "hf")
    names = sorted(os.listdir(out))
    common = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json"]
    tok_files = ["tokenizer.json", "tokenizer_config.json"]
    if tok.kind == "sentencepiece":
        assert names == sorted(common + tok_files + ["tokenizer.model"])
        assert (out / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    else:
        assert names == sorted(common + tok_files)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    # Begin-of-text is EOS (mile.conditioning): a document starts after an EOS in training.
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == _special_ids(tok)
    texts = FIXED_TEXTS + _random_texts()
    if kind == "sentencepiece-1k":
        texts += _code_like_docs(n=100, seed=6)  # unseen text in the training distribution
    decoded = 0
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == [tok.eos_id] + ids, text  # one EOS in front, never <s>
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.encode(text) == [tok.eos_id] + ids, text
        if tok.decode(ids) == text:  # where mile's tokenizer round-trips, HF's does too
            assert hf_tok.decode([tok.eos_id] + ids, skip_special_tokens=True) == text, text
            decoded += 1
    print(f"{kind}: {len(texts)} texts encode alike, {decoded} round-trip")
    # Batched, as lm-evaluation-harness calls it.
    assert hf_tok(texts[:50], add_special_tokens=False)["input_ids"] == [tok.encode(t) for t in texts[:50]]
    if tok.kind == "sentencepiece":
        # mile's SentencePiece model round-trips any text; its dummy "▁" shows as an extra token.
        assert decoded == len(texts)
        assert tok.encode("") == []
    if kind == "sentencepiece":
        assert tok.id_to_piece(tok.encode(" the earth")[0]) == "▁"
    elif kind == "bytelevel":
        assert decoded == len(texts)
    else:
        assert decoded > 0  # <unk> loses the characters it replaced


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-1k"])
def test_sentencepiece_model_read_and_merges(tokenizers_by_kind, kind):
    """The export's own ModelProto reader agrees with SentencePiece; merges come from the pieces."""
    tok = tokenizers_by_kind[kind]
    sp = tok.processor
    model = export._SentencePieceModel.parse(tok.path.read_bytes())
    assert [p for p, _, _ in model.pieces] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert [s for _, s, _ in model.pieces] == [sp.get_score(i) for i in range(sp.vocab_size())]
    kinds = [k for _, _, k in model.pieces]
    assert [i for i, k in enumerate(kinds) if k == 3] == [1, 2, 3]  # control: <s> </s> <pad>
    assert kinds[0] == 2 and kinds[4:260] == [6] * 256  # <unk>, then the 256 byte pieces
    assert (model.model_type, model.byte_fallback, model.add_dummy_prefix) == (2, True, True)
    assert (model.remove_extra_whitespaces, model.precompiled_charsmap) == (False, b"")  # identity
    merges = export._sentencepiece_merges(model.pieces)
    ids = {p: i for i, (p, _, _) in enumerate(model.pieces)}
    products = [ids[a + b] for a, b in merges]
    assert products == sorted(products)  # by score, i.e. by id for a trained BPE model
    assert set(products) == {i for i, (p, _, k) in enumerate(model.pieces) if k == 1 and len(p) > 1}


def test_refuses_tokenizer_larger_than_model(tmp_path, tokenizers_by_kind):
    cfg = tiny_model_config(vocab_size=TOKENIZER_VOCAB - 1, mlp_dim=64, max_seq_len=32)
    for kind in ("sentencepiece", "bytelevel"):
        with pytest.raises(ValueError, match=f"tokenizer has {TOKENIZER_VOCAB} pieces > model.vocab_size"):
            export.export_hf(
                Llama(cfg, rngs=nnx.Rngs(0)), cfg, tokenizers_by_kind[kind].path, tmp_path / kind
            )
        assert not (tmp_path / kind).exists()


def test_refuses_non_empty_out(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = _model_cfg(False)
    with pytest.raises(ValueError, match="not an empty directory"):
        export.export_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tokenizer.path, out)
    # The CLI checks before restoring anything, so a missing workdir does not matter here.
    proc = subprocess.run(
        [sys.executable, "-m", "mile.export", "--workdir", str(tmp_path / "none"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not an empty directory" in proc.stderr
    assert os.listdir(out) == ["keep.txt"]
