"""The paper's models and recipes (../shared/paper-spec.md), any of the three losses.

    --config configs/paper.py:468m,mile      (size: 468m | 1.2b | 6.7b; loss: ce | focal | mile)

Data defaults to an ArrayRecord TFDS dataset (the Pile is not in TFDS; c4/en is the stand-in):
set --config.data.tfds_name / --config.data.tfds_data_dir. Meshes are set per deployment, e.g.
--config.mesh.fsdp=-1 --config.mesh.data=1 on a pod slice.
"""

from configs import base

#              layers  hidden heads head_dim  mlp    seq   tokens/update  updates warmup
_SIZES = {
    "468m": dict(
        layers=24,
        dim=1024,
        heads=16,
        head_dim=64,
        mlp=4096,
        seq=1024,
        batch_tokens=1_048_576,
        steps=100_000,
        warmup=1_000,
    ),
    "1.2b": dict(
        layers=16,
        dim=2048,
        heads=8,
        head_dim=256,
        mlp=8192,
        seq=1024,
        batch_tokens=1_048_576,
        steps=100_000,
        warmup=1_000,
    ),
    "6.7b": dict(
        layers=32,
        dim=4096,
        heads=32,
        head_dim=128,
        mlp=11008,
        seq=2048,
        batch_tokens=4_194_304,
        steps=25_000,
        warmup=2_000,
    ),
}
_LOSSES = ("ce", "focal", "mile")


def get_config(arg: str = "468m,mile"):
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    size = parts[0] if parts else "468m"
    loss = parts[1] if len(parts) > 1 else "mile"
    if size not in _SIZES or loss not in _LOSSES:
        raise ValueError(
            f"configs/paper.py:{arg!r}: expected '<size>,<loss>' with size in {sorted(_SIZES)} "
            f"and loss in {list(_LOSSES)}, e.g. configs/paper.py:468m,mile"
        )
    s = _SIZES[size]
    c = base.get_config()
    c.model.update(
        vocab_size=32000,
        num_layers=s["layers"],
        embed_dim=s["dim"],
        num_heads=s["heads"],
        num_kv_heads=s["heads"],
        head_dim=s["head_dim"],
        mlp_dim=s["mlp"],
        max_seq_len=s["seq"],
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
    )
    c.loss.name = loss
    c.data.update(
        source="tfds",
        tfds_name="c4/en",
        vocab_size=32000,
        seq_len=s["seq"],
        global_batch_size=s["batch_tokens"] // s["seq"],
    )
    c.optim.update(learning_rate=3e-4, warmup_steps=s["warmup"])
    c.train.update(
        steps=s["steps"],
        log_every=50,
        eval_every=2000,
        eval_batches=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    )
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
