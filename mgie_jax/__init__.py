"""mgie_jax: a JAX/Flax NNX training pipeline for MGIE (MLLM-guided image editing)."""

import flax

# Parameters carry logical axis names as metadata; we place them on a mesh
# ourselves (mgie_jax.parallel) with explicit jit shardings, so Flax's eager
# sharding, which would demand a mesh at construction time, stays off.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
