"""Edit photos with a trained MGIE checkpoint, at each photo's own size and shape.

  python -m mgie_jax.edit --workdir=/tmp/mgie_tiny --image in.jpg --instruction "make it blue" --out out.png
  python -m mgie_jax.edit --workdir=W --image a.jpg --instruction "..." --image b.png --instruction "..." \\
      --out_dir edited/
  python -m mgie_jax.edit --workdir=W --manifest edits.jsonl --batch_size 4 --out_dir edited/
  python -m mgie_jax.edit --checkpoint=W/checkpoints/300 --image in.jpg --instruction "..." \\
      --steps 100 --text_scale 7.5 --image_scale 1.5 --seed 0 --resolution 512 --keep_unchanged

Prints the expressive instruction the MLLM wrote for each photo, and writes each edit atomically
as soon as its batch finishes. A manifest is JSON Lines, one edit per line:
{"image": "a.jpg", "instruction": "make it blue", "out": "a_blue.png", "seed": 3}
(paths relative to the manifest's folder; `out` defaults to <out_dir>/<image name>.png, `seed` to
--seed + the line's index). A bad line is reported with its number and skipped; outputs that exist
are skipped, so a killed run re-run writes only the rest. Row i of any run equals a one-image run
with --seed=<its seed>. Reads the workdir without writing to it. Every input is checked before a
model is loaded; a mistake in the flags is one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags
from PIL import Image

from mgie_jax.core import cli, errors
from mgie_jax.core.images import BadImage, open_rgb

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint (or --step) is used")
flags.DEFINE_string("checkpoint", None, "a checkpoint folder (<workdir>/checkpoints/<step>)")
flags.DEFINE_integer("step", None, "with --workdir: this checkpoint step instead of the latest")
flags.DEFINE_multi_string("image", [], "input image (any format PIL reads); repeat with --instruction")
flags.DEFINE_multi_string("instruction", [], "the terse edit instruction, one per --image")
flags.DEFINE_string("manifest", None, "JSON Lines of edits: image, instruction, optional out and seed")
flags.DEFINE_string("out", "edited.png", "where the edited image is written (one --image)")
flags.DEFINE_string("out_dir", None, "folder for the edits of several images: <out_dir>/<image name>.png")
flags.DEFINE_integer("batch_size", 1, "edits per batch (photos of one shape bucket share a batch)")
flags.DEFINE_enum("crop", "none", ["none", "square"],
                  "none: edit the whole photo at its aspect ratio, return it at its size; square: MGIE's "
                  "centre crop, returned at --resolution")
flags.DEFINE_bool("keep_unchanged", False, "keep the photo's own pixels wherever the edit did not change it")
flags.DEFINE_integer("steps", 100, "sampling steps")
flags.DEFINE_enum("sampler", "euler_ancestral", ["euler_ancestral", "euler", "ddim"],
                  "sampler, on the noise schedule the model was trained with")
flags.DEFINE_float("text_scale", 7.5, "text guidance scale")
flags.DEFINE_float("image_scale", 1.5, "image guidance scale")
flags.DEFINE_integer("seed", 0, "sampling seed (row i of a batch: seed + i unless its line gives one)")
flags.DEFINE_integer("resolution", 0, "long side the model edits at; 0 = 512 for pretrained models, "
                     "the training size otherwise (rounded to the model's stride)")
flags.DEFINE_integer("max_new_tokens", 96, "length limit of the expressive instruction")


@dataclasses.dataclass
class Row:
  where: str          # "line 3" of the manifest, or "--image 2"
  image: str
  instruction: str
  out: str
  seed: int
  size: tuple = ()    # (width, height), read when checked


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


def default_out(image: str, out_dir: str) -> str:
  return os.path.join(out_dir, os.path.splitext(os.path.basename(image))[0] + ".png")


def rows_from_flags() -> list[Row]:
  images, instructions = FLAGS.image, FLAGS.instruction
  if not images:
    raise errors.FLAG_MISSING(detail="--image is required (or --manifest)")
  if len(images) != len(instructions):
    raise errors.BAD_OPTION(flag="--instruction", detail=f"{len(instructions)} instructions for {len(images)} images",
                            fix="give one --instruction after each --image")
  if len(images) > 1 and not FLAGS.out_dir:
    raise errors.BAD_OPTION(flag="--out_dir", detail=f"{len(images)} images need a folder for their edits",
                            fix="add --out_dir=FOLDER (--out names the edit of a single image)")
  rows = []
  for k, (image, instruction) in enumerate(zip(images, instructions)):
    out = FLAGS.out if len(images) == 1 and not FLAGS.out_dir else default_out(image, FLAGS.out_dir)
    rows.append(Row(f"--image {k + 1}", image, instruction.strip(), out, FLAGS.seed + k))
  return rows


def rows_from_manifest(path: str) -> tuple[list[Row], list[tuple[str, str]]]:
  """(rows, bad lines as (where, what is wrong)); checked as far as the text goes."""
  if not os.path.isfile(path):
    raise errors.BAD_OPTION(flag="--manifest", detail=f"{path} {'is a folder' if os.path.isdir(path) else 'does not exist'}",
                            fix='give a JSON Lines file, one {"image": ..., "instruction": ...} per line')
  base = os.path.dirname(os.path.abspath(path))
  rows, bad = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"line {n}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append((where, f"not JSON ({e.msg})"))
        continue
      if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        bad.append((where, 'no "image" path'))
        continue
      image = os.path.join(base, rec["image"])
      out = rec.get("out")
      if out is None and not FLAGS.out_dir:
        bad.append((where, 'no "out" and no --out_dir'))
        continue
      out = os.path.join(base, out) if out else default_out(image, FLAGS.out_dir)
      seed = rec.get("seed", FLAGS.seed + n - 1)
      if not isinstance(seed, int):
        bad.append((where, f'"seed" {seed!r} is not an integer'))
        continue
      rows.append(Row(where, image, str(rec.get("instruction") or "").strip(), out, seed))
  return rows, bad


def check_row(row: Row, strict: bool) -> str | None:
  """What is wrong with a row (None: fine); with `strict` the first problem is raised."""
  try:
    if not row.instruction:
      raise errors.EMPTY_INSTRUCTION()
    check_out_path(row.out)
    row.size = check_image_file(row.image).size
  except errors.UserError as e:
    if strict:
      raise
    return str(e)
  return None


def batches(rows: list[Row], shape_of, batch_size: int) -> list[list[Row]]:
  """Rows grouped by edit shape (a batch is one shape), in file order within a shape."""
  groups: dict = {}
  for r in rows:
    groups.setdefault(shape_of(r), []).append(r)
  return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def main(argv):
  del argv
  cli.quiet_libraries()
  # Deferred until the flags have parsed (--help and flag mistakes answer at once): JAX and the
  # model stack take seconds to import.
  import jax

  from mgie_jax.inference import photos
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.inference.shapes import bucket_for, stride
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.run.compile_cache import use_compile_cache

  # --- everything a user can get wrong, before any model is built -----------------------------
  for flag, value in (("--steps", FLAGS.steps), ("--batch_size", FLAGS.batch_size)):
    if value < 1:
      raise errors.BAD_OPTION(flag=flag, detail=f"{value}", fix="use 1 or more")
  if FLAGS.resolution < 0:
    raise errors.BAD_OPTION(flag="--resolution", detail=f"{FLAGS.resolution}", fix="use 0 (the model's) or a size")
  if FLAGS.out_dir and os.path.isfile(FLAGS.out_dir):
    raise errors.OUT_PATH(flag="--out_dir", path=FLAGS.out_dir, detail="is a file", fix="give a folder")
  if FLAGS.manifest:
    if FLAGS.image:
      raise errors.BAD_OPTION(flag="--manifest", detail="given with --image", fix="use one or the other")
    rows, bad = rows_from_manifest(FLAGS.manifest)
  else:
    rows, bad = rows_from_flags(), []
  strict = not FLAGS.manifest               # flags are the user's typing: the first mistake stops
  todo, done = [], []
  for r in rows:
    if (FLAGS.manifest or len(rows) > 1) and os.path.exists(r.out):
      done.append(r)                        # written by an earlier (killed) run of this batch
      continue
    problem = check_row(r, strict)
    (bad.append((r.where, problem)) if problem else todo.append(r))
  seen: dict = {}
  for r in list(todo):
    if r.out in seen:
      bad.append((r.where, f"writes {r.out}, as {seen[r.out]} does"))
      todo.remove(r)
    seen.setdefault(r.out, r.where)
  for where, what in bad:
    print(f"skipped {where}: {what}", file=sys.stderr)
  if not todo:
    if not done:
      raise errors.BAD_OPTION(flag="--manifest", detail=f"no usable line in {FLAGS.manifest}",
                              fix="see the skipped lines above")
    print(f"nothing to do: {len(done)} edits already written")
    return
  workdir, step = workdir_lib.locate(FLAGS.workdir, FLAGS.checkpoint, FLAGS.step,
                                     option="--checkpoint=<workdir>/checkpoints/<step> of a trained run")

  # --- the model and the edits -------------------------------------------------------------------
  # The second edit of a run (or of another run of the same architecture) compiles nothing.
  use_compile_cache(workdir_lib.saved_config(workdir, step))
  run = workdir_lib.load(workdir, step, option="--step={step}" if FLAGS.workdir
                         else f"--checkpoint={workdir}/checkpoints/{{step}}")
  m = stride(run.model.config)
  resolution = FLAGS.resolution or (512 if run.pretrained else run.config.data.resolution)
  resolution = max(m, round(resolution / m) * m)
  shape_of = lambda r: (resolution, resolution) if FLAGS.crop == "square" else bucket_for(r.size, resolution, m)
  written = 0
  with jax.set_mesh(run.mesh):
    for batch in batches(todo, shape_of, FLAGS.batch_size):
      # The last batch of a shape is padded with its own last row: one compile per shape bucket.
      padded = batch + [batch[-1]] * (FLAGS.batch_size - len(batch))
      outs, texts = photos.edit_photos(
          run.model, run.tok, [open_rgb(r.image) for r in padded], [r.instruction for r in padded],
          seeds=[r.seed for r in padded], resolution=resolution, crop=FLAGS.crop,
          keep_unchanged=FLAGS.keep_unchanged, steps=FLAGS.steps, text_scale=FLAGS.text_scale,
          image_scale=FLAGS.image_scale, sampler=inference.default_sampler(run.model, FLAGS.sampler),
          max_new_tokens=FLAGS.max_new_tokens)
      for r, out, text in zip(batch, outs, texts):
        save_image(out, r.out)
        written += 1
        h, w = out.shape[:2]
        print(f"{r.where}: expressive instruction: {text}" if len(rows) > 1 else f"expressive instruction: {text}")
        print(f"edited image ({w}x{h}, checkpoint step {step}): {r.out}", flush=True)
  if len(rows) > 1 or bad:
    print(f"edited {written}, already written {len(done)}, skipped {len(bad)} bad "
          f"{'line' if FLAGS.manifest else 'row'}{'s' * (len(bad) != 1)}")


if __name__ == "__main__":
  cli.run(main)
