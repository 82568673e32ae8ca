"""The one tiny model config the tests share: a test that builds its own model starts here and
overrides fields by keyword. (Trainer tests run the shipped configs/tiny.py through
train_helpers.tiny_config instead: their golden values are pinned to it.)"""

import ml_collections

TINY_MODEL = dict(
    vocab_size=50,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,  # grouped-query attention, so every test exercises it
    head_dim=8,
    mlp_dim=48,
    max_seq_len=16,
    rope_base=10000.0,
    norm_eps=1e-5,
    init_std=0.01,
    dtype="float32",
    param_dtype="float32",
    remat="none",
    scan_layers=False,
    attention="xla",
)


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    unknown = set(overrides) - set(TINY_MODEL)
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}")
    return ml_collections.ConfigDict({**TINY_MODEL, **overrides})
