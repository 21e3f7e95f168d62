"""mgie_jax: a JAX/Flax NNX training pipeline for MGIE (MLLM-guided image editing)."""

from mgie_jax.core import backends

# With libtpu installed and no TPU here, starting JAX would print libtpu's start-up errors first.
backends.skip_absent_tpu()

__version__ = "0.1.0"
