"""Fine-tune on MagicBrush's train split (configs/finetune/common.py says what starts it and which
numbers are guesses). Build: python -m data_pipelines.build magicbrush --source parquet
--manual_dir <parquet folder> --data_dir /data/tfds  ->  /data/tfds/magicbrush/parquet/1.0.0."""

from configs.finetune.common import finetune


def get_config(arg=None):
  # ~8.8k training turns: 4 epochs at batch 32 is ~1,100 steps (a guess, as the others).
  return finetune(arg, "magicbrush", steps=1100, eval_split="dev")
