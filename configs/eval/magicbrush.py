"""MagicBrush test (535 sessions, 1,053 turns), as its evaluation/image_eval.py scores it.

  python -m data_pipelines.build magicbrush --source folder --manual_dir /data/MagicBrush/test --data_dir /data/tfds
  python -m mgie_jax.evaluate --config=configs/eval/magicbrush.py --workdir=/evals/magicbrush \\
      --config.dataset.dir=/data/tfds/magic_brush/folder/1.0.0 --config.runs=/runs/mgie \\
      --config.metric_models.clip=/ckpt/clip-vit-base-patch32 --config.metric_models.dino=/ckpt/dino-vits16

Protocol choices:
  * single: every turn edited from its ground-truth input, all turns scored; multi: each turn
    from the model's own previous output, the final turn scored (MagicBrush's two settings).
  * L1/L2 on [0, 1] after resizing the edit (PIL bicubic) to the ground truth's size.
  * CLIP-I = cosine of CLIP ViT-B/32 image embeddings; CLIP-T = the edit vs the turn's local
    caption (MGIE: CVS and CTS); DINO = ViT-S/16 CLS cosine. Raw cosines (papers print x100).
"""

from configs.eval import base


def get_config(arg=None):
  c = base.get_config()
  c.dataset.name = "magicbrush"
  c.dataset.split = "test"
  c.mode = "single,multi"
  c.metrics = "l1,l2,clip_i,dino,clip_t"
  return c
