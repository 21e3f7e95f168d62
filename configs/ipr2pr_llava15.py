"""MGIE on LLaVA-1.5-7B: the full recipe (configs/ipr2pr.py) on a transformers-layout LLaVA-1.5
folder (e.g. llava-hf/llava-1.5-7b-hf), which is easy to get, instead of LLaVA-Lightning-7B-v1-1,
which is published as a delta on LLaMA-7B.

  python -m mgie_jax.train --config=configs/ipr2pr_llava15.py --workdir=W \\
      --config.pretrained.llava=/ckpt/llava-1.5-7b-hf --config.pretrained.sd=/ckpt/stable-diffusion-v1-5 \\
      --config.data.dir=/data/tfds/ipr2pr/folder/1.0.0

What changes with LLaVA-1.5 (read from the folder: no CLIP folder is needed, it holds its tower):
- CLIP ViT-L/14 at 336 px: 576 image tokens (v1: 256 at 224 px), read from layer -2, CLS dropped;
- a two-layer MLP projector (GELU) instead of one Linear;
- its prompt ("llava_1_5", mgie_jax/text/template.py): LLaVA-1.5 was trained with Vicuna v1's
  conversation, the same system line and USER/ASSISTANT roles as MGIE's, but with the image
  first, as a run of <image> tokens followed by a newline, and without <im_start>/<im_end>. MGIE's
  question is asked after the image so that the LLaVA reads it the way it learned to; the answer
  (expressive instruction, [IMG0..7], </s>) is unchanged;
- its vocabulary is padded to 32064 rows, so the MGIE tokens take padding rows (ids 32002-32012,
  after <image> and <pad>) instead of growing the table.

Sequences: 576 image tokens + ~45 of prompt + the expressive instruction (~40-80) + 8 [IMG] + </s>,
so about 680 tokens: max_length 768 with buckets at 704 and 736. The expressive-instruction targets
are the release's (written by LLaVA v1); nothing else changes in the recipe. The learning rates and
budget are the v1 recipe's, not tuned for LLaVA-1.5.
"""

from configs import ipr2pr


def get_config(arg=None):
  c = ipr2pr.get_config(arg)
  c.model.template = "llava_1_5"
  c.pretrained.vision_tower = ""          # the llava-hf folder holds CLIP
  c.data.max_length = 768
  c.data.length_buckets = (704, 736)
  return c
