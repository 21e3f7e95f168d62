"""Data for mgie_jax: TFDS ArrayRecord builders, the synthetic edit dataset and the grain loader."""
