"""A small model on the synthetic language with known next-token distributions (issue 11).

    python launch.py --config configs/synthetic.py --workdir workdirs/synth
    python -m mile.ground_truth --workdir workdirs/synth          # excess loss and KL by bucket
"""

import ml_collections

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
    # The generator (mile.data.synthetic.SyntheticSpec, whose defaults these are). Kept out of
    # base.py so that workdirs of the other corpora keep resuming (new data.* keys would not).
    c.data.synthetic = ml_collections.ConfigDict(
        dict(
            seed=0,
            train_tokens=2_000_000,
            zipf_exponent=1.0,
            eos_prob=0.005,
            kind_shares=(0.4, 0.35, 0.25),  # deterministic, multi-label, flat contexts
            max_labels=6,
            target_exponent=0.5,  # continuations of non-flat contexts drawn by zipf weight ** this
            flat_noise=1.0,
        )
    )
    c.optim.update(warmup_steps=30)
    c.train.update(steps=500, log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100)
    return c
