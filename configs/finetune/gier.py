"""Fine-tune on GIER's train split (configs/finetune/common.py says what starts it and which numbers
are guesses). Build: python -m data_pipelines.build gier --manual_dir <GIER folder> --data_dir /data/tfds."""

from configs.finetune.common import finetune


def get_config(arg=None):
  # GIER's train split is a few thousand requests: ~5 epochs at batch 32 (a guess).
  return finetune(arg, "gier", steps=800)
