"""mile: MiLe loss and a JAX/Flax trainer for decoder-only language models."""
