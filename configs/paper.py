"""The paper's models and recipes (../shared/paper-spec.md), any of the three losses.

    --config configs/paper.py:468m,mile      (size: 468m | 1.2b | 6.7b; loss: ce | focal | mile)
    --config configs/paper.py:size=6.7b,loss=ce   (the same, as keywords)

Data defaults to an ArrayRecord TFDS dataset (the Pile is not in TFDS; c4/en is the stand-in):
set --config.data.tfds_name / --config.data.tfds_data_dir. Meshes are set per deployment, e.g.
--config.mesh.fsdp=-1 --config.mesh.data=1 on a pod slice.
"""

import dataclasses

from configs import base


@dataclasses.dataclass(frozen=True)
class Size:
    layers: int
    dim: int
    heads: int
    head_dim: int
    mlp: int
    seq: int
    batch_tokens: int  # tokens per optimiser update
    steps: int
    warmup: int


_SIZES = {  #         layers  dim  heads head_dim  mlp    seq   tokens/update  updates  warmup
    "468m": Size(24, 1024, 16, 64, 4096, 1024, 1_048_576, 100_000, 1_000),
    "1.2b": Size(16, 2048, 8, 256, 8192, 1024, 1_048_576, 100_000, 1_000),
    "6.7b": Size(32, 4096, 32, 128, 11008, 2048, 4_194_304, 25_000, 2_000),
}
_LOSSES = ("ce", "focal", "mile")


def _parse(arg: str) -> tuple[str, str]:
    """(size, loss) from "468m,mile" or the keyword form "size=468m,loss=mile" (any order)."""
    chosen = {"size": "468m", "loss": "mile"}
    for i, part in enumerate(p.strip() for p in arg.split(",") if p.strip()):
        key, _, value = part.rpartition("=")
        key = key.strip() or ("size", "loss", "extra")[min(i, 2)]
        if key not in chosen:
            raise ValueError(f"configs/paper.py:{arg!r}: unknown setting {part!r}; use size=... and loss=...")
        chosen[key] = value.strip()
    return chosen["size"], chosen["loss"]


def get_config(arg: str = "468m,mile"):
    size, loss = _parse(arg)
    if size not in _SIZES or loss not in _LOSSES:
        raise ValueError(
            f"configs/paper.py:{arg!r}: expected '<size>,<loss>' (or 'size=<size>,loss=<loss>') with size "
            f"in {sorted(_SIZES)} and loss in {list(_LOSSES)}, e.g. configs/paper.py:468m,mile"
        )
    s = _SIZES[size]
    c = base.get_config()
    c.model.update(
        vocab_size=32000,
        num_layers=s.layers,
        embed_dim=s.dim,
        num_heads=s.heads,
        num_kv_heads=s.heads,
        head_dim=s.head_dim,
        mlp_dim=s.mlp,
        max_seq_len=s.seq,
        dtype="bfloat16",
        remat="full",
        scan_layers=True,
    )
    c.loss.name = loss
    c.data.update(
        source="tfds",
        tfds_name="c4/en",
        vocab_size=32000,  # or --config.data.tokenizer=path/to/llama/tokenizer.model, as the paper
        # Token ids stored once (python -m mile.prepare --workers N, ahead of the job): a host then
        # reads 10M tokens per CPU-second against 0.7-0.9M tokenising on the fly
        # (experiments/results/input_pipeline.md).
        pretokenize=True,
        seq_len=s.seq,
        global_batch_size=s.batch_tokens // s.seq,
    )
    c.optim.update(learning_rate=3e-4, warmup_steps=s.warmup)
    c.train.update(
        steps=s.steps,
        log_every=50,
        eval_every=2000,
        eval_batches=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    )
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
