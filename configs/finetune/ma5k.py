"""Fine-tune on MA5k-Req's train split (configs/finetune/common.py says what starts it and which
numbers are guesses). Build: python -m data_pipelines.build ma5k --manual_dir <MA5k folder> --data_dir /data/tfds."""

from configs.finetune.common import finetune


def get_config(arg=None):
  # MA5k-Req has ~25k training requests: ~2 epochs at batch 32 (a guess).
  return finetune(arg, "ma5k", steps=1500)
