"""Fine-tune on EVR's train split (configs/finetune/common.py says what starts it and which numbers
are guesses). Build: python -m data_pipelines.build evr --manual_dir <EVR folder> --data_dir /data/tfds."""

from configs.finetune.common import finetune


def get_config(arg=None):
  # EVR's train split is a few thousand requests: ~5 epochs at batch 32 (a guess).
  return finetune(arg, "evr", steps=800)
