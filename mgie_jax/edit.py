"""Edit an image with a trained MGIE checkpoint.

  python -m mgie_jax.edit --workdir=/tmp/mgie_tiny --image in.jpg --instruction "make it blue" --out out.png
  python -m mgie_jax.edit --checkpoint=/tmp/mgie_tiny/checkpoints/300 --image in.jpg --instruction "..." \\
      --steps 100 --text_scale 7.5 --image_scale 1.5 --seed 0 --resolution 512

Prints the expressive instruction the MLLM wrote, then writes the edited image.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint is used")
flags.DEFINE_string("checkpoint", None, "a checkpoint folder (<workdir>/checkpoints/<step>)")
flags.DEFINE_string("image", None, "input image (any format PIL reads)")
flags.DEFINE_string("instruction", None, "the terse edit instruction")
flags.DEFINE_string("out", "edited.png", "where the edited image is written")
flags.DEFINE_integer("steps", 100, "Euler-ancestral sampling steps")
flags.DEFINE_float("text_scale", 7.5, "text guidance scale")
flags.DEFINE_float("image_scale", 1.5, "image guidance scale")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("resolution", 0, "output size; 0 = 512 for pretrained models, the training size otherwise")
flags.DEFINE_integer("max_new_tokens", 96, "length limit of the expressive instruction")
flags.mark_flags_as_required(["image", "instruction"])


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax
  import ml_collections
  from PIL import Image

  from mgie_jax import inference
  from mgie_jax.training.checkpoint import Checkpointer
  from mgie_jax.training.setup import make_setup, tokenizer_dir

  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  if FLAGS.checkpoint:
    ckpt_dir = os.path.abspath(FLAGS.checkpoint.rstrip("/"))
    workdir, step = os.path.dirname(os.path.dirname(ckpt_dir)), int(os.path.basename(ckpt_dir))
  else:
    workdir, step = os.path.abspath(FLAGS.workdir), None
  if not os.path.exists(FLAGS.image):
    raise app.UsageError(f"--image {FLAGS.image} does not exist")
  ckpt = Checkpointer(workdir, every=1, keep=1000, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise app.UsageError(f"no checkpoint in {ckpt.directory}")
  c = ml_collections.ConfigDict(ckpt.saved_config(step))
  c.mesh = dict(data=1, fsdp=-1, tensor=1)      # inference: whatever devices are here
  run = make_setup(c, tokenizer_dir(c, workdir))
  state = ckpt.restore(run.abstract_state(), None, step)
  model = run.model(state.params, run.frozen())
  resolution = FLAGS.resolution or (512 if c.model.init == "pretrained" else c.data.resolution)
  image = Image.open(FLAGS.image)
  with jax.set_mesh(run.mesh):
    out, texts = inference.edit(model, run.tok, [image], [FLAGS.instruction], key=jax.random.key(FLAGS.seed),
                                resolution=resolution, steps=FLAGS.steps, text_scale=FLAGS.text_scale,
                                image_scale=FLAGS.image_scale, max_new_tokens=FLAGS.max_new_tokens)
  ckpt.close()
  Image.fromarray(out[0]).save(FLAGS.out)
  print(f"expressive instruction: {texts[0]}")
  print(f"edited image ({resolution}x{resolution}, checkpoint step {step}): {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
