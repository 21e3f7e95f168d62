"""LGIE at real size: the full recipe (configs/ipr2pr.py) with the image removed from the language
model's input. The LLaMA comes from the same LLaVA folder (its CLIP tower is built but never read);
edit head, UNet, losses, data and budget are MGIE's.

  python -m mgie_jax.train --config=configs/lgie.py --workdir=W \\
      --config.pretrained.llava=/ckpt/LLaVA-Lightning-7B-v1-1 \\
      --config.pretrained.vision_tower=/ckpt/clip-vit-large-patch14 \\
      --config.pretrained.sd=/ckpt/stable-diffusion-v1-5 --config.data.dir=/data/tfds/ipr2pr/folder/1.0.0

Without the 256 image tokens a sequence is about 90 tokens: max_length 256, buckets 128 and 192.
"""

from configs import ipr2pr


def get_config(arg=None):
  c = ipr2pr.get_config(arg)
  c.model.template = "text_only"
  c.data.max_length = 256
  c.data.length_buckets = (128, 192)
  return c
