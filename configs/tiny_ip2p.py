"""The text-only baseline on the same synthetic data and budget as configs/tiny.py: InstructPix2Pix
with the same UNet and VAE, conditioned on a small CLIP-style text encoder (trained from scratch)
of the terse instruction. It never sees the image when reading the instruction, so "make the
largest shape blue" is a guess for it; MGIE's LLM reads both.

  python -m mgie_jax.train --config=configs/tiny_ip2p.py --workdir=/tmp/ip2p_tiny
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.model.kind = "ip2p"
  c.trainable = ("text_encoder", "unet")
  c.data.text_length = 32
  c.train.edit_loss_weight = 1.0          # the only loss term
  return c
