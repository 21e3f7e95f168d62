"""EVR test (495 pairs, 1,485 requests; three requests per pair, each one example).

  python -m data_pipelines.build evr --manual_dir /data/EVR --data_dir /data/tfds
  python -m mgie_jax.evaluate --config=configs/eval/evr.py --workdir=/evals/evr \\
      --config.dataset.dir=/data/tfds/evr/1.0.0 --config.runs=/runs/mgie \\
      --config.metric_models.clip=/ckpt/clip-vit-base-patch32 --config.metric_models.dino=/ckpt/dino-vits16

The MGIE paper reports L1 / DINO / CVS (= CLIP-I) on EVR.
"""

from configs.eval import base


def get_config(arg=None):
  c = base.get_config()
  c.dataset.name = "evr"
  c.metrics = "l1,dino,clip_i"
  c.plot = "l1,clip_i"
  return c
