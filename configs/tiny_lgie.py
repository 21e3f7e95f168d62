"""LGIE at toy size: configs/tiny.py with the image removed from the language model's input.

The paper's language-guided baseline: the same language model, edit head and UNet, trained by the
same command and losses on the same data (the expressive instructions as targets), but the
language model writes the expressive instruction from the terse instruction alone: no CLIP
features and no image tokens in its prompt ("text_only", mgie_jax/text/template.py). The UNet
still sees the input image, as in MGIE and InstructPix2Pix.

  python -m mgie_jax.train --config=configs/tiny_lgie.py --workdir=/tmp/lgie_tiny
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.model.template = "text_only"
  return c
