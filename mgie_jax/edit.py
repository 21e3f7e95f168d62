"""Edit an image with a trained MGIE checkpoint.

  python -m mgie_jax.edit --workdir=/tmp/mgie_tiny --image in.jpg --instruction "make it blue" --out out.png
  python -m mgie_jax.edit --checkpoint=/tmp/mgie_tiny/checkpoints/300 --image in.jpg --instruction "..." \\
      --steps 100 --text_scale 7.5 --image_scale 1.5 --seed 0 --resolution 512

Prints the expressive instruction the MLLM wrote, then writes the edited image. Reads the
workdir without writing to it, and restores only the trained parameters. Every input is checked
before a model is loaded; a mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import os

from absl import flags
from PIL import Image

from mgie_jax.core import cli, errors
from mgie_jax.core.images import BadImage, open_rgb

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint (or --step) is used")
flags.DEFINE_string("checkpoint", None, "a checkpoint folder (<workdir>/checkpoints/<step>)")
flags.DEFINE_integer("step", None, "with --workdir: this checkpoint step instead of the latest")
flags.DEFINE_string("image", None, "input image (any format PIL reads)")
flags.DEFINE_string("instruction", None, "the terse edit instruction")
flags.DEFINE_string("out", "edited.png", "where the edited image is written")
flags.DEFINE_integer("steps", 100, "sampling steps")
flags.DEFINE_enum("sampler", "euler_ancestral", ["euler_ancestral", "euler", "ddim"],
                  "sampler, on the noise schedule the model was trained with")
flags.DEFINE_float("text_scale", 7.5, "text guidance scale")
flags.DEFINE_float("image_scale", 1.5, "image guidance scale")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("resolution", 0, "output size; 0 = 512 for pretrained models, the training size otherwise")
flags.DEFINE_integer("max_new_tokens", 96, "length limit of the expressive instruction")
flags.mark_flags_as_required(["image", "instruction"])


def check_out_path(path: str, flag: str = "--out") -> None:
  """An output file path that can be written: not a folder, an image extension PIL knows, and
  its folder exists or can be created."""
  if os.path.isdir(path):
    raise errors.OUT_PATH(flag=flag, path=path, detail="is a folder", fix="give a file name, e.g. edited.png")
  ext = os.path.splitext(path)[1].lower()
  if ext not in Image.registered_extensions():
    raise errors.OUT_PATH(flag=flag, path=path, detail=f"unknown image extension {ext or '(none)'!r}",
                          fix="use .png or .jpg")
  parent = os.path.dirname(os.path.abspath(path))
  probe = parent
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
    raise errors.OUT_PATH(flag=flag, path=path, detail=f"{probe} is not a writable folder",
                          fix="choose a path in a folder you can write to")


def check_image_file(path: str, flag: str = "--image"):
  """The image at `path` as RGB, or a UserError."""
  if not os.path.exists(path):
    raise errors.IMAGE_MISSING(flag=flag, path=path)
  if os.path.isdir(path):
    raise errors.IMAGE_NOT_FILE(flag=flag, path=path)
  try:
    return open_rgb(path)
  except BadImage as e:
    raise errors.IMAGE_UNREADABLE(flag=flag, path=path, detail=str(e)) from None


def save_image(array, path: str) -> None:
  """Write atomically: a crash never leaves a half-written image under the final name."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
  Image.fromarray(array).save(tmp)
  os.replace(tmp, path)


def main(argv):
  del argv
  cli.quiet_libraries()
  # Deferred until the flags have parsed (--help and flag mistakes answer at once): JAX and the
  # model stack take seconds to import.
  import jax

  from mgie_jax.inference import pipeline as inference
  from mgie_jax.run import workdir as workdir_lib

  # --- everything a user can get wrong, before any model is built -----------------------------
  image = check_image_file(FLAGS.image)
  if not FLAGS.instruction.strip():
    raise errors.EMPTY_INSTRUCTION()
  check_out_path(FLAGS.out)
  if FLAGS.steps < 1:
    raise errors.BAD_OPTION(flag="--steps", detail=f"{FLAGS.steps} sampling steps", fix="use 1 or more")
  workdir, step = workdir_lib.locate(FLAGS.workdir, FLAGS.checkpoint, FLAGS.step,
                                     option="--checkpoint=<workdir>/checkpoints/<step> of a trained run")

  # --- the model and the edit --------------------------------------------------------------------
  run = workdir_lib.load(workdir, step, option="--step={step}" if FLAGS.workdir
                         else f"--checkpoint={workdir}/checkpoints/{{step}}")
  c = run.config
  resolution = FLAGS.resolution or (512 if run.pretrained else c.data.resolution)
  with jax.set_mesh(run.mesh):
    out, texts = inference.edit(run.model, run.tok, [image], [FLAGS.instruction.strip()],
                                key=jax.random.key(FLAGS.seed), resolution=resolution, steps=FLAGS.steps,
                                text_scale=FLAGS.text_scale, image_scale=FLAGS.image_scale,
                                sampler=inference.default_sampler(run.model, FLAGS.sampler),
                                max_new_tokens=FLAGS.max_new_tokens)
  save_image(out[0], FLAGS.out)
  print(f"expressive instruction: {texts[0]}")
  print(f"edited image ({resolution}x{resolution}, checkpoint step {step}): {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
