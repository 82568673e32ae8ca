"""Analytic model FLOPs of the LLaMA decoder and the peak throughput of common accelerators.

Model FLOPs count what the model needs, not what a given implementation spends, so MFU from
different runs and codebases is comparable:

    per token = 6 * non-embedding parameters            (forward 2N, backward 4N)
              + 12 * layers * heads * head_dim * seq     (attention scores and values, fwd + bwd)

Non-embedding parameters include the LM head (a real matmul); the embedding table is a lookup
and is left out. The attention term is PaLM's (Chowdhery et al. 2022, appendix B): it counts the
full seq x seq score matrix, which is what `mile.model` computes on TPU and GPU (the causal mask
is applied to full scores; on CPU the XLA attention skips 7/16 of it, see `mile.attention`). Recomputation under `remat="full"` is not model FLOPs; `hardware_flops_per_token`
adds it, for a roofline of what the chip must actually execute. Both are checked against XLA's
own count in tests/test_flops.py.

The chip table is a set of published peak figures (vendor spec sheets, dense bf16, no sparsity).
They are estimates of the ceiling, not measurements: sustained matmul throughput is lower.
"""

from __future__ import annotations

import dataclasses


def param_counts(model_cfg) -> dict[str, int]:
    """Parameters of `mile.model.Llama` by part; `model_cfg` is any object with the model fields."""
    c = model_cfg
    d, hd = c.embed_dim, c.head_dim
    attention = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o, k, v
    mlp = 3 * d * c.mlp_dim  # gate, up, down
    norms = 2 * d
    layer = attention + mlp + norms
    counts = {
        "embedding": c.vocab_size * d,
        "layers": c.num_layers * layer,
        "final_norm": d,
        "head": d * c.vocab_size,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts


def attention_flops_per_token(model_cfg, seq_len: int) -> int:
    """Score and value matmuls (forward + backward) of one token over a `seq_len` window."""
    c = model_cfg
    return 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def model_flops_per_token(model_cfg, seq_len: int) -> int:
    """Model FLOPs of one training token (forward and backward): 6 N + the attention term."""
    return 6 * param_counts(model_cfg)["non_embedding"] + attention_flops_per_token(model_cfg, seq_len)


def hardware_flops_per_token(model_cfg, seq_len: int) -> int:
    """Model FLOPs plus what `remat="full"` recomputes: each block's forward pass except the MLP's
    down projection, whose output only feeds the next block (saved) and is never read by the
    backward pass, so autodiff does not recompute it."""
    flops = model_flops_per_token(model_cfg, seq_len)
    if getattr(model_cfg, "remat", "none") == "full":
        c = model_cfg
        recomputed = param_counts(c)["layers"] - c.num_layers * c.mlp_dim * c.embed_dim
        flops += 2 * recomputed + attention_flops_per_token(c, seq_len) // 3
    return flops


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (estimates for planning): memory, dense bf16 peak, bandwidth."""

    name: str
    hbm_gib: float
    peak_bf16_flops: float  # FLOP/s, dense
    hbm_bytes_per_s: float
    device_kinds: tuple[str, ...]  # jax `device.device_kind` strings (substring match for GPUs)
    # What one chip can send per second over all its links (half the published bidirectional
    # inter-chip figure: ICI on TPUs, NVLink within one node on GPUs).
    link_bytes_per_s: float


# Google Cloud TPU system-architecture pages and NVIDIA datasheets (SXM parts). Links: TPU
# bidirectional ICI per chip v4 600 GB/s (2400 Gbps each way), v5e 400, v5p 1200, v6e 800;
# NVLink A100 600 GB/s, H100 and H200 900.
CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1.2e12, ("TPU v4",), 300e9),
    "v5e": Chip("TPU v5e", 16, 197e12, 0.819e12, ("TPU v5 lite", "TPU v5e"), 200e9),
    "v5p": Chip("TPU v5p", 95, 459e12, 2.765e12, ("TPU v5", "TPU v5p"), 600e9),
    "v6e": Chip("TPU v6e", 32, 918e12, 1.64e12, ("TPU v6 lite", "TPU v6e"), 400e9),
    "a100": Chip("NVIDIA A100", 80, 312e12, 2.0e12, ("A100",), 300e9),
    "h100": Chip("NVIDIA H100", 80, 989e12, 3.35e12, ("H100",), 450e9),
    "h200": Chip("NVIDIA H200", 141, 989e12, 4.8e12, ("H200",), 450e9),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The table entry for a jax `device_kind`, or None (CPU, unknown accelerators).

    TPU kinds must match exactly ("TPU v5" is v5p, "TPU v5 lite" is v5e); GPU kinds carry the
    part in a longer name ("NVIDIA H100 80GB HBM3"), so a substring match is used for them.
    """
    for chip in CHIPS.values():
        for kind in chip.device_kinds:
            if device_kind == kind or (not kind.startswith("TPU") and kind in device_kind):
                return chip
    return None
