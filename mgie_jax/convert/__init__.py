"""Weight import and export between PyTorch checkpoints and mgie_jax modules."""

from mgie_jax.convert.checkpoint import CheckpointError, open_weights, read_config
from mgie_jax.convert.mapping import Rule, export_state_dict, load_module
