"""Export a trained mile model in the Hugging Face LLaMA layout.

    python -m mile.export --workdir W --out DIR [--step N] [--tokenizer sp.model|tokenizer.json]

DIR gets config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json and special_tokens_map.json (plus tokenizer.model for a SentencePiece
tokenizer), so `transformers.AutoModelForCausalLM.from_pretrained(DIR)`,
`AutoTokenizer.from_pretrained(DIR)` and lm-evaluation-harness (`--model hf
--model_args pretrained=DIR`) load it directly.

The tokenizer encodes exactly as mile's does (tests/test_export.py). For a SentencePiece model
the export builds tokenizer.json itself: HF's own conversion (a Metaspace pre-tokenizer) drops
the dummy-prefix "▁" of a text that starts with a space, so it uses a normalizer that always adds
it, no pre-tokenizer, and BPE merges derived from the piece scores (_sentencepiece_merges). A
Hugging Face tokenizer.json is copied with only its post-processor changed (below). Both get
tokenizer_class PreTrainedTokenizerFast, which loads tokenizer.json as written.

No weight permutation is needed: mile's RoPE rotates pairs (i, i + d/2) like HF LLaMA, its
query heads share kv heads in the same grouping as HF's repeat_kv, and RMSNorm is the same
float32 formula. tests/test_export.py checks HF logits against `Llama.logits`.

Conditioning (mile.conditioning): training joins documents with EOS and never shows `<s>`, so
a document starts after an EOS. The export says so the way GPT-2's files do: its begin-of-text
token *is* EOS (`bos_token` "</s>", `bos_token_id` = eos id, `add_bos_token` true, and a
tokenizer.json post-processor that puts the EOS in front), so HF's tokenizer, `generate()` and
lm-evaluation-harness's `--model hf` put the same one EOS in front of a request as mile's
evaluator and harness backend do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile

from absl import logging
import numpy as np

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


class _TokenizerInfo:
    """The export's view of a mile tokenizer of either kind (mile.data.tokenizer.load_tokenizer):
    its kind, size, and the ids and strings of the special tokens the HF files name."""

    def __init__(self, tok):
        def known(i) -> int:
            return int(i) if i is not None and i >= 0 else -1

        self.kind, self.path, self.vocab_size = tok.kind, pathlib.Path(tok.path), int(tok.vocab_size)
        self.eos_id, self.pad_id, self.unk_id = known(tok.eos_id), known(tok.pad_id), known(tok.unk_id)
        self.piece = tok.id_to_piece
        self.eos_token, self.pad_token, self.unk_token = (
            tok.id_to_piece(i) if i >= 0 else None for i in (self.eos_id, self.pad_id, self.unk_id)
        )


def hf_config(mcfg, tok: _TokenizerInfo) -> dict:
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
        "bos_token_id": tok.eos_id,  # begin-of-text is EOS (module docstring)
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
    }


def _tokenizer_files(tok: _TokenizerInfo, max_len: int) -> tuple[dict, dict]:
    special = {
        "bos_token": tok.eos_token,  # begin-of-text is EOS (module docstring)
        "eos_token": tok.eos_token,
    }
    if tok.unk_token is not None:
        special["unk_token"] = tok.unk_token
    if tok.pad_token is not None:
        special["pad_token"] = tok.pad_token
    tok_cfg = {
        # Loads tokenizer.json as written (LlamaTokenizer would rebuild its pre-tokenizer).
        "tokenizer_class": "PreTrainedTokenizerFast",
        # A request starts a document, and in training a document follows an EOS. tokenizer.json's
        # post-processor says the same for readers that ignore these two.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        **special,
    }
    # mile reads "</s>" (or "<|endoftext|>") inside a text as characters, never as the special
    # token: SentencePiece always does, and mile.data.tokenizer.HFTokenizer is set to.
    tok_cfg["split_special_tokens"] = True
    return tok_cfg, special


def _eos_in_front(eos_token: str, eos_id: int):
    """The post-processor of mile.conditioning: one EOS in front of a text (and of each of a pair)."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{eos_token}:0 $A:0",
        pair=f"{eos_token}:0 $A:0 {eos_token}:1 $B:1",
        special_tokens=[(eos_token, eos_id)],
    )


# SentencePiece's ModelProto enums (sentencepiece_model.proto).
_SP_BPE = 2
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED = 1, 2, 3, 4


def _proto_fields(buf: bytes):
    """Yields (field number, value) of a serialized protobuf message: an int for a varint, bytes
    for a length-delimited field (string, bytes, message), 4 or 8 raw bytes for a fixed one."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 2, 5):
            size = {1: 8, 5: 4}.get(wire) or varint()
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, value


@dataclasses.dataclass
class _SentencePieceModel:
    """What the export reads of a SentencePiece ModelProto (sentencepiece_model.proto; proto2
    defaults). Parsed here: the generated sentencepiece_model_pb2 needs a matching protobuf."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) by id
    model_type: int = 1  # UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @classmethod
    def parse(cls, data: bytes) -> "_SentencePieceModel":
        model = cls(pieces=[])
        for field, value in _proto_fields(data):
            if field == 1:  # SentencePiece {piece = 1; score = 2; type = 3}
                piece = {1: b"", 2: bytes(4), 3: _SP_NORMAL} | dict(_proto_fields(value))
                score = struct.unpack("<f", piece[2])[0]
                model.pieces.append((piece[1].decode("utf-8"), score, piece[3]))
            elif field == 2:  # TrainerSpec
                spec = dict(_proto_fields(value))
                model.model_type = spec.get(3, model.model_type)
                model.treat_whitespace_as_suffix = bool(spec.get(24, False))
                model.byte_fallback = bool(spec.get(35, False))
            elif field == 3:  # NormalizerSpec
                spec = dict(_proto_fields(value))
                model.precompiled_charsmap = spec.get(2, b"")
                model.add_dummy_prefix = bool(spec.get(3, True))
                model.remove_extra_whitespaces = bool(spec.get(4, True))
                model.escape_whitespaces = bool(spec.get(5, True))
        return model


def _sentencepiece_merges(pieces) -> list[tuple[str, str]]:
    """BPE merges, highest priority first, that make Hugging Face's BPE encode as SentencePiece's.

    SentencePiece's BPE has no merge list: starting from characters, it repeatedly joins the
    adjacent pair whose concatenation is a piece with the highest score (leftmost on a tie).
    Hugging Face's BPE joins the adjacent pair with the lowest merge rank (leftmost on a tie).
    So every split of a normal piece into two pieces is a merge, ranked by the piece's score.
    Splits of the same piece get consecutive ranks, shorter left part first.
    """
    mergeable = {piece for piece, _, kind in pieces if kind in (_SP_NORMAL, _SP_USER_DEFINED)}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != _SP_NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_normalizer(spec: _SentencePieceModel):
    """A Hugging Face normalizer doing what SentencePiece's normalizer does to a text before BPE.

    No pre-tokenizer: SentencePiece runs BPE over the whole normalized text, and the dummy prefix
    "▁" goes in front of every non-empty text, also one that starts with a space (Hugging Face's
    Metaspace pre-tokenizer skips it there).
    """
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Replace(Regex("^ | $"), ""))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # Prepend skips an empty text, as SentencePiece does
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _sentencepiece_tokenizer_json(model_path: pathlib.Path, tok: _TokenizerInfo):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as the SentencePiece BPE model does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    spec = _SentencePieceModel.parse(model_path.read_bytes())
    if spec.model_type != _SP_BPE or spec.treat_whitespace_as_suffix:
        raise ValueError(
            f"tokenizer {model_path}: only SentencePiece BPE models with the whitespace as prefix "
            "(as mile trains them, and LLaMA's) can be exported exactly."
        )
    pieces = spec.pieces
    if [p for p, _, _ in pieces] != [tok.piece(i) for i in range(len(pieces))]:
        raise ValueError(f"tokenizer {model_path}: could not read its pieces (not a SentencePiece model?)")
    if any(kind == _SP_USER_DEFINED for _, _, kind in pieces) and spec.add_dummy_prefix:
        logging.warning(
            "tokenizer %s has user-defined pieces: the exported tokenizer puts a '▁' after them "
            "where SentencePiece does not.", model_path
        )
    bpe = models.BPE(
        vocab={piece: i for i, (piece, _, _) in enumerate(pieces)},
        merges=_sentencepiece_merges(pieces),
        unk_token=tok.unk_token,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )
    hf = Tokenizer(bpe)
    hf.normalizer = _sentencepiece_normalizer(spec)
    hf.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the dummy prefix
    hf.decoder = decoders.Sequence(steps)
    hf.add_tokens(
        [AddedToken(p, special=False, normalized=False) for p, _, kind in pieces if kind == _SP_USER_DEFINED]
    )
    hf.add_special_tokens(
        [
            AddedToken(p, special=True, normalized=False)
            for p, _, kind in pieces
            if kind in (_SP_CONTROL, _SP_UNKNOWN)
        ]
    )
    hf.post_processor = _eos_in_front(tok.eos_token, tok.eos_id)
    return hf


def _hf_tokenizer_json(json_path: pathlib.Path, tok: _TokenizerInfo):
    """The tokenizer.json as mile reads it, with mile's post-processor (one EOS in front).

    A ByteLevel post-processor (it only trims offsets) is kept; one adding other special tokens
    (BERT's [CLS], RoBERTa's <s>) is dropped: mile never adds them.
    """
    from tokenizers import Tokenizer, models

    def post_processor_json(hf) -> dict | None:
        return json.loads(hf.to_str()).get("post_processor")

    spec = json.loads(Tokenizer.from_file(str(json_path)).to_str())
    old = spec.get("post_processor") or {}
    old_steps = old.get("processors", []) if old.get("type") == "Sequence" else [old]
    keep = [step for step in old_steps if step.get("type") == "ByteLevel"]
    template = Tokenizer(models.BPE())
    template.post_processor = _eos_in_front(tok.eos_token, tok.eos_id)
    eos = post_processor_json(template)
    spec["post_processor"] = {"type": "Sequence", "processors": keep + [eos]} if keep else eos
    return Tokenizer.from_str(json.dumps(spec))


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
        from mile.data.tokenizer import local_tokenizer

        with tempfile.TemporaryDirectory(prefix="mile-export-") as d:
            # A remote tokenizer.json comes with the tokenizer_config.json beside it (its EOS).
            tok = local_tokenizer(str(tokenizer_path), pathlib.Path(d) / "cache")
            export_hf(model, cfg, tok, pathlib.Path(d) / "out")
            paths.upload_tree(pathlib.Path(d) / "out", out_dir)
        return out_dir
    from safetensors.numpy import save_file  # only the export needs it

    out_dir = pathlib.Path(out_dir)
    mcfg = cfg.model if hasattr(cfg, "model") else cfg
    c = ModelConfig.from_cfg(mcfg)
    if c != model.config:
        raise ValueError("cfg.model does not match model.config; pass the config the model was built with.")
    tokenizer_path = pathlib.Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise ValueError(
            f"tokenizer {tokenizer_path} not found; pass --tokenizer path/to/sp.model (or tokenizer.json)."
        )
    from mile.data.tokenizer import load_tokenizer

    tok = _TokenizerInfo(load_tokenizer(tokenizer_path))
    if tok.eos_id < 0:
        raise ValueError(
            f"tokenizer {tokenizer_path} has no EOS token; pass the tokenizer the model was trained with."
        )
    if tok.vocab_size > c.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} pieces > model.vocab_size={c.vocab_size}; "
            "pass the tokenizer the model was trained with."
        )
    if tok.kind == "sentencepiece":
        hf_tokenizer = _sentencepiece_tokenizer_json(tokenizer_path, tok)
    else:
        hf_tokenizer = _hf_tokenizer_json(tokenizer_path, tok)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    save_file(hf_state_dict(model), str(weights), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the usual umask-based mode like the others.
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)
    tok_cfg, special = _tokenizer_files(tok, c.max_seq_len)
    generation = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}
    if tok.pad_id >= 0:
        generation["pad_token_id"] = tok.pad_id
    files = {
        "config.json": hf_config(mcfg, tok),
        "tokenizer_config.json": tok_cfg,
        "special_tokens_map.json": special,
        "generation_config.json": generation,
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    hf_tokenizer.save(str(out_dir / "tokenizer.json"))
    if tok.kind == "sentencepiece":
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")  # for SentencePiece readers
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mile.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="sp.model or tokenizer.json to export (default: mile.data.prepare(cfg.data).tokenizer_path)",
    )
    args = parser.parse_args(argv)
    try:
        # Fail before the (slow) restore if the output would be overwritten.
        _check_out_dir(args.out)
        from mile.restore import load_trained_model, trained_data

        model, cfg, step = load_trained_model(args.workdir, step=args.step)
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:

            # Cached: only reads files when training already prepared them (same cwd / cache_dir).
            tokenizer_path = trained_data(cfg).tokenizer_path
        out = export_hf(model, cfg, tokenizer_path, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
