"""A web page to try edits on: upload a photo, type an instruction, see the expressive instruction
the MLLM wrote and the edit beside the input, at the input's size and shape.

  python -m mgie_jax.demo --workdir=/tmp/mgie_tiny                      # a trained run (latest step)
  python -m mgie_jax.demo --checkpoint=/tmp/mgie_tiny/checkpoints/1500
  python -m mgie_jax.demo --config=configs/eval/base.py \\             # the released weights, as evaluate
      --config.pretrained.llava=/ckpt/llava-7b --config.pretrained.sd=/ckpt/ip2p \\
      --config.pretrained.mllm_pt=/ckpt/mgie/mllm.pt --config.pretrained.unet_pt=/ckpt/mgie/unet.pt

Serves on 127.0.0.1 (--host to change it) with no share link and no analytics, and downloads
nothing. One edit runs at a time; the others wait in the queue. A run's test split, where it has
one, gives the page's examples. Needs the `[demo]` extra (gradio). Every input is checked before
a model is loaded; a mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import tempfile

from absl import flags
from ml_collections import config_flags

from mgie_jax.core import cli, errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir: its latest checkpoint (or --step) is served")
flags.DEFINE_string("checkpoint", None, "a checkpoint folder (<workdir>/checkpoints/<step>)")
flags.DEFINE_integer("step", None, "with --workdir: this checkpoint step instead of the latest")
config_flags.DEFINE_config_file("config", None, "an evaluation config (configs/eval/*.py) whose "
                                "--config.pretrained.* name a pretrained MGIE's local files", lock_config=True)
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 exposes the page to your network)")
flags.DEFINE_integer("port", 7860, "port to serve on")
flags.DEFINE_integer("max_pixels", 4096 * 4096, "larger uploads are refused with a message")
flags.DEFINE_integer("examples", 6, "how many of the run's test examples the page offers")
flags.DEFINE_integer("max_new_tokens", 96, "length limit of the expressive instruction")

TINY_NOTE = ("This is the tiny recipe's model: it edits 32-pixel synthetic scenes of coloured shapes "
             "(recolour, remove, add, move a shape; the examples are its test images). Real photos are "
             "beyond a 32-pixel toy: it will answer, but not with a meaningful edit.")


def check_source():
  """'run' or 'release', with every flag checked (nothing loaded)."""
  from mgie_jax.run.checks import check_folder
  if FLAGS.config is not None:
    if FLAGS.workdir or FLAGS.checkpoint:
      raise errors.BAD_OPTION(flag="--config", detail="given with a run", fix="serve a run or the released weights")
    p = FLAGS.config.pretrained
    for key in ("llava", "sd"):
      check_folder(p[key], f"config.pretrained.{key}")
    for key in ("mllm_pt", "unet_pt"):
      if p[key] and not os.path.isfile(p[key]):
        raise errors.PRETRAINED_MISSING(name=f"config.pretrained.{key}", path=p[key])
    return "release"
  return "run"


def run_examples(workdir, config, n: int, folder: str) -> list[tuple[str, str]]:
  """The first `n` test examples of the run's dataset as (image file, instruction)."""
  from data_pipelines.loader import open_source
  from mgie_jax.core.images import decode_rgb
  dirs = [config.data.dir] if config.data.dir else sorted(glob.glob(os.path.join(str(workdir), "data", "tfds", "*", "*", "*")))
  for d in dirs:
    try:
      source = open_source(d, "test")
    except Exception:   # no dataset there (moved, or a run on another machine): no examples
      continue
    out = []
    for i in range(min(n, len(source))):
      r = source[i]
      path = os.path.join(folder, f"example_{i}.png")
      decode_rgb(r["input_image"]).save(path)
      out.append((path, r["instruction"].decode()))
    return out
  return []


def main(argv):
  del argv
  cli.quiet_libraries()
  if FLAGS.port < 0 or FLAGS.port > 65535:
    raise errors.BAD_OPTION(flag="--port", detail=f"{FLAGS.port}", fix="use 0-65535")
  if importlib.util.find_spec("gradio") is None:
    raise errors.BAD_OPTION(flag="mgie_jax.demo", detail="gradio is not installed",
                            fix="pip install -e \".[demo]\"")
  kind = check_source()
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported: no calls home
  # Deferred until the flags have parsed: JAX, the model stack and gradio take seconds to import.
  import jax

  from mgie_jax.inference import demo_app
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.run.compile_cache import use_compile_cache

  examples, note = [], ""
  if kind == "run":
    workdir, step = workdir_lib.locate(FLAGS.workdir, FLAGS.checkpoint, FLAGS.step,
                                       option="--checkpoint=<workdir>/checkpoints/<step> of a trained run")
    use_compile_cache(workdir_lib.saved_config(workdir, step))   # a restart compiles nothing
    run = workdir_lib.load(workdir, step, option="--step={step}" if FLAGS.workdir
                           else f"--checkpoint={workdir}/checkpoints/{{step}}")
    model, tok, mesh = run.model, run.tok, run.mesh
    resolution = 512 if run.pretrained else run.config.data.resolution
    title = f"MGIE: {os.path.basename(os.path.normpath(str(workdir)))} at step {step}"
    if not run.pretrained and resolution <= 64:
      note = TINY_NOTE
  else:
    c = FLAGS.config
    use_compile_cache(c)
    model, tok, mesh = workdir_lib.load_release(c.recipe, c.pretrained, c.pretrained_dtype, devices=jax.local_devices())
    resolution, title = c.resolution or 512, f"MGIE: {c.pretrained.name}"
  editor = demo_app.PhotoEditor(model, tok, mesh, resolution, max_pixels=FLAGS.max_pixels,
                                max_new_tokens=FLAGS.max_new_tokens)
  with tempfile.TemporaryDirectory(prefix="mgie_demo_") as folder:   # the examples' files, removed on exit
    if kind == "run":
      examples = run_examples(workdir, run.config, FLAGS.examples, folder)
    app = demo_app.build_app(editor, examples, note, title=title)
    print(f"serving on http://{FLAGS.host}:{FLAGS.port} (Ctrl-C stops)", flush=True)
    demo_app.serve(app, FLAGS.host, FLAGS.port, [folder])


if __name__ == "__main__":
  cli.run(main)
