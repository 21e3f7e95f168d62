"""GIER test (618 pairs, 2,969 requests: each request of a pair is one example).

  python -m data_pipelines.build gier --manual_dir /data/GIER --data_dir /data/tfds
  python -m mgie_jax.evaluate --config=configs/eval/gier.py --workdir=/evals/gier \\
      --config.dataset.dir=/data/tfds/gier/1.0.0 --config.runs=/runs/mgie \\
      --config.metric_models.clip=/ckpt/clip-vit-base-patch32

The MGIE paper reports L1 / SSIM / CVS (= CLIP-I). SSIM as the GIER authors compute it:
Gaussian 11x11, sigma 1.5, zero "same" padding, mean over the whole map (`ssim_zero_pad`).
"""

from configs.eval import base


def get_config(arg=None):
  c = base.get_config()
  c.dataset.name = "gier"
  c.metrics = "l1,ssim_zero_pad,clip_i"
  c.plot = "l1,clip_i"
  return c
