"""mile.export: HF LlamaForCausalLM built from the export gives mile's logits; tokenizer ids; CLI."""

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
from mile.model import Llama  # noqa: E402
from model_helpers import tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_VOCAB = 320
MODEL_VOCAB = 352  # larger than the tokenizer, as model.vocab_size may be padded


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = (
        "in the beginning god created heaven and earth light darkness waters "
        "firmament evening morning day night seed fruit tree 1 2 3 Ünïcödé, naïve!"
    ).split()
    docs = [" ".join(rng.choice(words, size=40)).capitalize() + "." for _ in range(200)]
    # The same trainer (options, special ids) as training runs use.
    return mtok.train_or_load(
        docs,
        corpus_fingerprint="export-test",
        vocab_size=TOKENIZER_VOCAB,
        cache_dir=tmp_path_factory.mktemp("tok"),
    )


def _model_cfg(scan_layers):
    # init_std 0.3 so logits spread widely (std ~1-2) and the comparison means something.
    return tiny_model_config(
        vocab_size=MODEL_VOCAB, mlp_dim=64, max_seq_len=32, init_std=0.3, scan_layers=scan_layers
    )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hf_logits_match(tmp_path, tokenizer, scan_layers):
    cfg = ConfigDict({"model": _model_cfg(scan_layers)})
    model = Llama(cfg.model, rngs=nnx.Rngs(0))
    out = export.export_hf(model, cfg, tokenizer.path, tmp_path / "hf")

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    assert (hf_cfg["num_key_value_heads"], hf_cfg["vocab_size"]) == (2, MODEL_VOCAB)
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (2, 2, 3)  # begin = EOS

    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.dtype == torch.float32
    tokens = np.random.default_rng(1).integers(0, MODEL_VOCAB, size=(3, 32))
    want = np.asarray(model.logits(jnp.asarray(tokens, jnp.int32)))
    with torch.no_grad():
        got = hf(torch.tensor(tokens)).logits.numpy()
    assert want.std() > 0.5, "logits too close to 0 for a meaningful check"
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"scan_layers={scan_layers}: max relative logit difference {rel:.2e}")
    assert rel < 1e-4


def test_hf_tokenizer_matches(tmp_path, tokenizer):
    cfg = _model_cfg(False)
    out = export.export_hf(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tokenizer.path, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    # Begin-of-text is EOS (mile.conditioning): a document starts after an EOS in training.
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 2, 3)
    for text in [
        "In the beginning God created the heaven and the earth.",
        "Day 123,  night\n\ntree   fruit",
        "Naïve Ünïcödé ☃ 漢字 (byte fallback)",
    ]:
        ids = hf_tok(text)["input_ids"]
        assert ids == [2] + tokenizer.encode(text), text  # one EOS in front, never <s>
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    # Known difference: for text that already starts with a space, SentencePiece still adds
    # its dummy-prefix "▁" (an extra token) but HF's Metaspace pre-tokenizer does not.
    text = " the earth"
    assert tokenizer.encode(text)[1:] == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.processor.id_to_piece(tokenizer.encode(text)[0]) == "▁"


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
