"""Seconds per edit of a trained run, cold and warm, square crop against a 16:9 photo at its own shape.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny
  python benchmarks/bench_edit.py --workdir=/tmp/mgie_tiny

One of the run's test images, resized to 640x640 and 640x360, edited with "make the square blue" at
the run's resolution, 100 Euler-ancestral steps (the `edit` defaults). For each shape, in a fresh
process: loading the run; the first edit (cold: it compiles the greedy decode, the [IMG] pass, the
sampling loop and the VAE for that shape bucket); the median of three more edits (warm: what the
demo pays per edit once a shape has been seen), all without a persistent cache; then the whole
`python -m mgie_jax.edit` command twice with its own cache (a fresh user cache folder): the first
compiles and fills it, the second loads every program from it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IN_PROCESS = """
import json, statistics, sys, time
t0 = time.perf_counter()
import jax
from mgie_jax.core.images import open_rgb
from mgie_jax.inference import photos
from mgie_jax.inference.pipeline import default_sampler
from mgie_jax.run import workdir as workdir_lib
workdir, image, crop, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
wd, step = workdir_lib.locate(workdir, None, None, option="--workdir")
run = workdir_lib.load(wd, step)
load = time.perf_counter() - t0
photo = open_rgb(image)
def edit():
  t = time.perf_counter()
  with jax.set_mesh(run.mesh):
    out, texts = photos.edit_photos(run.model, run.tok, [photo], ["make the square blue"], seeds=[0],
                                    resolution=run.config.data.resolution, crop=crop, steps=steps,
                                    sampler=default_sampler(run.model))
  return time.perf_counter() - t, out[0].shape
cold, shape = edit()
warm = statistics.median(edit()[0] for _ in range(3))
print(json.dumps({"load": load, "cold": cold, "warm": warm, "out": list(shape)}))
"""


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained run (e.g. the README's tiny run)")
  p.add_argument("--steps", type=int, default=100)
  a = p.parse_args()
  from PIL import Image
  from benchmarks.common import machine
  from data_pipelines.loader import open_source
  from mgie_jax.core.images import decode_rgb

  data = os.path.join(a.workdir, "data", "tfds", "ipr2pr", "folder", "1.0.0")
  base = decode_rgb(open_source(data, "test")[0]["input_image"])
  print(machine())
  print(f"run {a.workdir}, {a.steps} steps")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")     # edit's cache starts empty
    for name, size, crop in (("square crop, 640x640 photo", (640, 640), "square"),
                             ("16:9 photo at its shape, 640x360", (640, 360), "none")):
      path = os.path.join(tmp, f"{size[0]}x{size[1]}.png")
      base.resize(size, Image.BICUBIC).save(path)
      r = subprocess.run([sys.executable, "-c", IN_PROCESS, a.workdir, path, crop, str(a.steps)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
      if r.returncode:
        sys.exit(r.stderr[-3000:])
      got = json.loads(r.stdout.strip().splitlines()[-1])
      cmd = [sys.executable, "-m", "mgie_jax.edit", f"--workdir={a.workdir}", f"--image={path}",
             "--instruction=make the square blue", f"--out={tmp}/out.png", f"--crop={crop}",
             f"--steps={a.steps}"]
      whole = []
      for _ in range(2):
        t0 = time.perf_counter()
        c = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if c.returncode:
          sys.exit(c.stderr[-3000:])
        whole.append(time.perf_counter() - t0)
      rows.append((name, got, whole))
  print("| what | load run s | first edit (cold) s | warm edit s | `edit` command, first s | `edit` command, again s |")
  print("|---|---|---|---|---|---|")
  for name, g, whole in rows:
    print(f"| {name} | {g['load']:.1f} | {g['cold']:.1f} | {g['warm']:.2f} | {whole[0]:.1f} | {whole[1]:.1f} |")

if __name__ == "__main__":
  main()
