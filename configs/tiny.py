"""A tiny model for tests and smoke runs (seconds on CPU)."""

from configs import base


def get_config():
    c = base.get_config()
    c.model.update(
        vocab_size=512,
        num_layers=2,
        embed_dim=32,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=64,
        max_seq_len=32,
    )
    c.data.update(vocab_size=512, seq_len=32, global_batch_size=8)
    c.optim.update(warmup_steps=2)
    c.train.update(steps=10, log_every=1, eval_every=5, eval_batches=2, checkpoint_every=5)
    return c
