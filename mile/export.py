"""Export a trained mile model in the Hugging Face LLaMA layout.

    python -m mile.export --workdir W --out DIR [--step N] [--tokenizer sp.model]

DIR gets config.json, model.safetensors (float32), tokenizer.model, tokenizer_config.json
and special_tokens_map.json, so `transformers.AutoModelForCausalLM.from_pretrained(DIR)`,
`AutoTokenizer.from_pretrained(DIR)` and lm-evaluation-harness (`--model hf
--model_args pretrained=DIR`) load it directly.

No weight permutation is needed: mile's RoPE rotates pairs (i, i + d/2) like HF LLaMA, its
query heads share kv heads in the same grouping as HF's repeat_kv, and RMSNorm is the same
float32 formula. tests/test_export.py checks HF logits against `Llama.logits`.

Conditioning (mile.conditioning): training joins documents with EOS and never shows `<s>`, so
a document starts after an EOS. The export says so the way GPT-2's files do: its begin-of-text
token *is* EOS (`bos_token` "</s>", `bos_token_id` = eos id, `add_bos_token` true), so HF's
tokenizer, `generate()` and lm-evaluation-harness's `--model hf` put the same one EOS in front
of a request as mile's evaluator and harness backend do.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import sentencepiece as spm

from mile import paths
from mile.model import Llama, ModelConfig


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _layer_params(model: Llama):
    """Yields per-layer dicts of float32 NumPy arrays, for looped or scanned layers."""
    c = model.config
    if c.scan_layers:
        # One Block whose params carry a leading [num_layers] axis.
        blocks = [(model.layers, i) for i in range(c.num_layers)]
    else:
        blocks = [(block, None) for block in model.layers]
    for block, i in blocks:

        def get(param):
            value = _np(param[...])
            return value if i is None else value[i]

        yield {
            "q": get(block.attn.q),
            "k": get(block.attn.k),
            "v": get(block.attn.v),
            "o": get(block.attn.o),
            "attn_norm": get(block.attn_norm.scale),
            "mlp_norm": get(block.mlp_norm.scale),
            "gate": get(block.mlp.gate),
            "up": get(block.mlp.up),
            "down": get(block.mlp.down),
        }


def hf_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """HF LlamaForCausalLM weights (Linear weights are [out, in]) as float32 NumPy arrays."""
    c = model.config
    d, h, kv, hd = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    out = {"model.embed_tokens.weight": _np(model.embedding[...])}
    for i, p in enumerate(_layer_params(model)):
        pre = f"model.layers.{i}."
        # [D, heads, hd] -> [heads*hd, D]: head-major rows, as HF views q/k/v as (heads, hd).
        out[pre + "self_attn.q_proj.weight"] = p["q"].reshape(d, h * hd).T
        out[pre + "self_attn.k_proj.weight"] = p["k"].reshape(d, kv * hd).T
        out[pre + "self_attn.v_proj.weight"] = p["v"].reshape(d, kv * hd).T
        out[pre + "self_attn.o_proj.weight"] = p["o"].reshape(h * hd, d).T
        out[pre + "mlp.gate_proj.weight"] = p["gate"].T
        out[pre + "mlp.up_proj.weight"] = p["up"].T
        out[pre + "mlp.down_proj.weight"] = p["down"].T
        out[pre + "input_layernorm.weight"] = p["attn_norm"]
        out[pre + "post_attention_layernorm.weight"] = p["mlp_norm"]
    out["model.norm.weight"] = _np(model.final_norm.scale[...])
    out["lm_head.weight"] = _np(model.head[...]).T
    # safetensors wants C-contiguous buffers; the transposes above are views.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(mcfg, sp: spm.SentencePieceProcessor) -> dict:
    c = ModelConfig.from_cfg(mcfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.embed_dim,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,
        "rope_scaling": None,
        "initializer_range": c.init_std,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        # transformers < 5 reads torch_dtype, >= 5 reads dtype.
        "torch_dtype": "float32",
        "dtype": "float32",
        "bos_token_id": sp.eos_id(),  # begin-of-text is EOS (module docstring)
        "eos_token_id": sp.eos_id(),
        "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None,
    }


def _tokenizer_files(sp: spm.SentencePieceProcessor, max_len: int) -> tuple[dict, dict]:
    def piece(i):
        return sp.id_to_piece(i) if i >= 0 else None

    special = {
        "bos_token": piece(sp.eos_id()),  # begin-of-text is EOS (module docstring)
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
    }
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        # A request starts a document, and in training a document follows an EOS.
        "add_bos_token": True,
        "add_eos_token": False,
        # SentencePiece's own add_dummy_prefix behaviour, without HF's legacy quirks.
        "legacy": False,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        **special,
    }
    return tok_cfg, special


def _check_out_dir(out_dir) -> None:
    if paths.exists(out_dir) and (not paths.isdir(out_dir) or paths.listdir(out_dir)):
        raise ValueError(f"--out {out_dir} exists and is not an empty directory; pass a new path.")


def export_hf(model: Llama, cfg, tokenizer_path, out_dir):
    """Writes model + tokenizer in the HF LLaMA layout to out_dir (new or empty); returns it.

    cfg is the run config (uses cfg.model) or the model config itself. A gs:// out_dir (or
    tokenizer) goes through mile.paths: the files are written locally, then uploaded one object each.
    """
    _check_out_dir(out_dir)
    if paths.is_remote(out_dir) or paths.is_remote(tokenizer_path):
        with paths.local_copy(tokenizer_path) as tok, tempfile.TemporaryDirectory(prefix="mile-export-") as d:
            export_hf(model, cfg, tok, d)
            paths.upload_tree(d, out_dir)
        return out_dir
    from safetensors.numpy import save_file  # only the export needs it

    out_dir = pathlib.Path(out_dir)
    mcfg = cfg.model if hasattr(cfg, "model") else cfg
    c = ModelConfig.from_cfg(mcfg)
    if c != model.config:
        raise ValueError("cfg.model does not match model.config; pass the config the model was built with.")
    tokenizer_path = pathlib.Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ValueError(f"tokenizer {tokenizer_path} not found; pass --tokenizer path/to/sp.model.")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if sp.vocab_size() > c.vocab_size:
        raise ValueError(
            f"tokenizer has {sp.vocab_size()} pieces > model.vocab_size={c.vocab_size}; "
            "pass the tokenizer the model was trained with."
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    save_file(hf_state_dict(model), str(weights), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the usual umask-based mode like the others.
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)
    tok_cfg, special = _tokenizer_files(sp, c.max_seq_len)
    files = {
        "config.json": hf_config(mcfg, sp),
        "tokenizer_config.json": tok_cfg,
        "special_tokens_map.json": special,
        "generation_config.json": {"bos_token_id": sp.eos_id(), "eos_token_id": sp.eos_id()},
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mile.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="sp.model to export (default: mile.data.prepare(cfg.data).tokenizer_path)",
    )
    args = parser.parse_args(argv)
    try:
        # Fail before the (slow) restore if the output would be overwritten.
        _check_out_dir(args.out)
        from mile.restore import load_trained_model

        model, cfg, step = load_trained_model(args.workdir, step=args.step)
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            import mile.data

            # Cached: only reads files when training already prepared them (same cwd / cache_dir).
            tokenizer_path = mile.data.prepare(cfg.data).tokenizer_path
        out = export_hf(model, cfg, tokenizer_path, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
