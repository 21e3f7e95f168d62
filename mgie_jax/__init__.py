"""mgie_jax: a JAX/Flax NNX training pipeline for MGIE (MLLM-guided image editing)."""

from mgie_jax.core import backends, hugepages

# `python -m mgie_jax.<command>` re-runs itself once with huge pages for its host buffers (see
# core/hugepages.py) before anything heavy is imported; nothing else is affected.
hugepages.reexec_with_huge_pages()

# With libtpu installed and no TPU here, starting JAX would print libtpu's start-up errors first.
backends.skip_absent_tpu()

__version__ = "0.1.0"
