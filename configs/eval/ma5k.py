"""MA5k-Req test (4,950 requests): global photo retouching requests on MIT-Adobe FiveK.

  python -m data_pipelines.build ma5k --manual_dir /data/MA5k-Req --data_dir /data/tfds
  python -m mgie_jax.evaluate --config=configs/eval/ma5k.py --workdir=/evals/ma5k \\
      --config.dataset.dir=/data/tfds/ma5k/1.0.0 --config.runs=/runs/mgie \\
      --config.metric_models.lpips=/ckpt/alexnet-owt-7be5be79.pth \\
      --config.metric_models.lpips_heads=/ckpt/lpips/weights/v0.1/alex.pth

The MGIE paper reports L1 / SSIM / LPIPS; SSIM zero-padded as the MA5k authors compute it,
LPIPS with the AlexNet backbone (v0.1 heads).
"""

from configs.eval import base


def get_config(arg=None):
  c = base.get_config()
  c.dataset.name = "ma5k"
  c.metrics = "l1,ssim_zero_pad,lpips"
  c.plot = "l1,lpips"
  return c
