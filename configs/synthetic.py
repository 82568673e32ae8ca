"""A small model on the synthetic language with known next-token distributions (issue 11).

    python launch.py --config configs/synthetic.py --workdir workdirs/synth
    python -m mile.ground_truth --workdir workdirs/synth          # excess loss and KL by bucket
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.update(
        vocab_size=2048,
        num_layers=2,
        embed_dim=128,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        mlp_dim=384,
        max_seq_len=64,
    )
    c.data.update(source="synthetic", vocab_size=2048, validation_every=20, seq_len=64, global_batch_size=16)
    c.optim.update(warmup_steps=30)
    c.train.update(steps=500, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100)
    return c
