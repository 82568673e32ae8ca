"""Every default of a run. Other configs start from this and override a few fields.

Override anything from the command line: --config.loss.name=focal --config.loss.gamma=0.5
"""

import ml_collections

from mile.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # LLaMA-style decoder (mile.model.ModelConfig).
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=8000,
            num_layers=4,
            embed_dim=256,
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
            mlp_dim=704,
            max_seq_len=256,
            rope_base=10000.0,
            norm_eps=1e-5,
            init_std=0.01,
            dtype="float32",  # compute dtype; "bfloat16" for mixed precision on accelerators
            param_dtype="float32",
            remat="none",  # "full": recompute each block in the backward pass
            scan_layers=False,  # stack layers and lax.scan them (fast compiles for deep models)
            attention="xla",  # "xla" | "cudnn" (NVIDIA GPU, bf16) | "splash" (TPU Pallas kernel)
        )
    )

    # The loss (mile.losses.get_loss). A hyperparameter the loss does not take must keep its default.
    c.loss = ml_collections.ConfigDict(
        dict(
            name="mile",  # "ce" | "focal" | "mile"
            gamma=1.0,
            sigma=1.0,
            normalization="global",  # "global" (exact over the optimiser batch) | "paper"
            chunk_size=0,  # tokens per fused LM-head tile; 0 = automatic
            head="fused",  # "fused" (tiled, no logits held) | "materialised" (full logits; for comparison)
        )
    )

    # Data (mile.data): corpus -> ArrayRecord store -> tokenizer -> (token store) -> grain windows.
    # mile.data.DataConfig reads and checks every key.
    c.data = ml_collections.ConfigDict(
        dict(
            source="kjv",  # "kjv" (Debian's bible-kjv-text) | "text" | "tfds" | "synthetic"
            # source="text": files, directories, globs: .txt .jsonl .jsonl.gz .jsonl.zst .parquet
            text_files=(),  # --config.data.text_files=a.txt,corpus/,shards/*.jsonl.zst
            tfds_name="",  # source="tfds": a prepared ArrayRecord TFDS dataset, e.g. "c4/en"
            tfds_data_dir="",  # source="tfds": its TFDS data_dir
            text_key="text",  # the text feature (tfds) / JSONL field / parquet column (text)
            bad_records="error",  # a malformed record: "error" (file and line) | "skip" (counted)
            train_split="train",  # source="tfds": the split to train on
            eval_split="validation",  # source="tfds": the split to evaluate on
            validation_every=50,  # kjv/text/synthetic: every N-th document is held out
            tokenizer="train",  # "train" | a SentencePiece .model | a Hugging Face tokenizer.json
            pretokenize=False,  # store token ids (mile.prepare), so training only reads and packs
            vocab_size=8000,  # trained tokenizer's vocabulary (<= model.vocab_size); synthetic: its ids
            tokenizer_max_docs=100000,  # documents sampled (strided) to train the tokenizer
            cache_dir=".cache",  # corpora, TFDS datasets and tokenizers
            shuffle_seed=0,  # training shuffle seed
            read_threads=0,  # grain read/tokenise threads per data stream; 0 = the main thread
            read_workers=0,  # grain worker processes per data stream (other batches); 0 = none
            seq_len=256,  # tokens per sequence
            global_batch_size=16,  # sequences per optimiser update, over all processes
            # Disjoint document streams, each filling its own rows of every batch (mile.multihost);
            # 0 = one per process. Fix it to get the same batches under any process count.
            shards=0,
        )
    )

    # AdamW + linear warmup + cosine decay + global-norm clipping (optax).
    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3,
            end_learning_rate=0.0,
            warmup_steps=30,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            no_decay=("norm",),  # parameters whose path contains one of these get no decay
            clip_norm=1.0,
            num_microbatches=1,  # gradient accumulation: global batch split into this many
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=300,
            log_every=10,
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
            keep_checkpoints=3,
            max_nonfinite_steps=3,  # stop after this many consecutive non-finite losses
            distributed="auto",  # "auto" | "yes" | "no": call jax.distributed.initialize()
            # A step, evaluation or save taking longer is a hang: stacks dumped, exit 124 (mile.watchdog).
            hang_timeout_s=0.0,  # 0 = automatic: 20 x the median step once 5 are timed, >= 600 s
            startup_timeout_s=3600.0,  # the limit for the first of each (they compile)
            profile_steps="",  # "START,END": jax.profiler trace of those steps in workdir/profile
        )
    )

    # Device mesh; -1 = all remaining devices. Batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = tuple(DEFAULT_RULES)
    return c
