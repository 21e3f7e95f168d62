"""The synthetic edit data (configs/tiny.py's): MGIE against the text-only baseline and copying.

  python -m mgie_jax.evaluate --config=configs/eval/synthetic.py --workdir=/tmp/eval_tiny \\
      --config.dataset.dir=/tmp/mgie_tiny/data/tfds/ipr2pr/folder/1.0.0 --config.runs=/tmp/mgie_tiny

Metrics need no model: L1 as MagicBrush computes it, and two exact checks the generator makes
possible (its images use a fixed palette): edit_acc, the share of the pixels the edit changes
that come out in the right colour, and keep_acc, the share of the others left right. MGIE rows
also carry its expressive instructions' teacher-forced token accuracy and exact match. For the
grounded subset: --config.dataset.subset=grounded
--config.dataset.subset_file=<workdir>/data/synthetic_source/subsets.json
"""

from configs.eval import base


def get_config(arg=None):
  c = base.get_config()
  c.dataset.name = "synthetic"
  c.dataset.split = "validation+test"        # both held out (40 examples with the tiny recipe)
  c.metrics = "l1,edit_acc,keep_acc"
  c.text_scales = "4"                        # the tiny recipe's validation setting
  c.image_scales = "1.5"
  c.sample_steps = 20
  c.max_new_tokens = 40
  c.batch_size = 16
  c.plot = "l1,edit_acc"
  return c
