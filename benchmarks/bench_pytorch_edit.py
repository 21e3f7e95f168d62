"""Seconds per edit: our `edit` against the PyTorch-side edit (mgie_jax.inference.pytorch_pipeline) on the same
run and its exports, same image, settings and noise.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny
  python -m mgie_jax.export --workdir=/tmp/mgie_tiny --out=/tmp/mgie_tiny_export --dtype=float32 \\
      --format=mgie,llava-hf,diffusers
  python benchmarks/bench_pytorch_edit.py --workdir=/tmp/mgie_tiny --export=/tmp/mgie_tiny_export

Rows: the whole `python -m mgie_jax.edit` command (load, compile, edit); the whole PyTorch-side
process (load the exports, one edit); then, in each process, a second edit of the same image
(warm: what a server pays per edit). Also prints the largest pixel difference between the two.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TORCH_SIDE = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from PIL import Image
from mgie_jax.inference.pytorch_pipeline import MGIEPipeline
export, work, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = MGIEPipeline.from_export(export)
noise = np.load(work + "/noise.npy")
run = lambda: pipe.edit(Image.open(work + "/image.png"), "make the square blue", resolution=32, steps=steps,
                        latents=np.load(work + "/latents.npy"), noise=list(noise), output_type="np")
image, text = run()
first = time.perf_counter() - t0
t1 = time.perf_counter()
run()
np.save(work + "/torch.npy", image)
print(json.dumps({"process": first, "warm": time.perf_counter() - t1, "text": text}))
"""


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained tiny run")
  p.add_argument("--export", required=True, help="its export (mgie, llava-hf and diffusers, float32)")
  p.add_argument("--steps", type=int, default=100)
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  from PIL import Image
  from benchmarks.common import machine
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.diffusion import draw_noise, edit_images, make_sampler
  from data_pipelines.loader import open_source
  from mgie_jax.core.images import decode_rgb
  work = tempfile.mkdtemp()
  data = os.path.join(a.workdir, "data", "tfds", "ipr2pr", "folder", "1.0.0")
  decode_rgb(open_source(data, "test")[0]["input_image"]).save(os.path.join(work, "image.png"))

  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "mgie_jax.edit", f"--workdir={a.workdir}", f"--image={work}/image.png",
                  "--instruction=make the square blue", f"--out={work}/ours.png", f"--steps={a.steps}"],
                 check=True, capture_output=True, cwd=ROOT)
  ours_process = time.perf_counter() - t0

  workdir, step = workdir_lib.locate(a.workdir)
  run = workdir_lib.load(workdir, step)
  image = Image.open(os.path.join(work, "image.png"))
  sampler = make_sampler(inference.default_sampler(run.model), a.steps)
  pixels, clip = inference.prepare([image], 32, run.model.config.clip_size)

  def ours():
    with jax.set_mesh(run.mesh):
      texts, cond, null = inference.conditions(run.model, run.tok, clip, ["make the square blue"])
      out = edit_images(run.model.unet, run.model.vae, sampler, jnp.asarray(pixels), cond, null,
                        key=jax.random.key(0))
      return np.asarray(out)[0], texts[0]

  ours()
  t1 = time.perf_counter()
  want, text = ours()
  ours_warm = time.perf_counter() - t1
  vae = run.model.vae.config
  factor = 2 ** (len(vae.block_out_channels) - 1)
  latents, noise = draw_noise(jax.random.key(0), sampler,
                              (1, pixels.shape[1] // factor, pixels.shape[2] // factor, vae.latent_channels))
  np.save(os.path.join(work, "latents.npy"), np.asarray(latents).transpose(0, 3, 1, 2))
  np.save(os.path.join(work, "noise.npy"), np.asarray(noise).transpose(0, 1, 4, 2, 3))
  out = subprocess.run([sys.executable, "-c", TORCH_SIDE, a.export, work, str(a.steps)], check=True,
                       capture_output=True, text=True, cwd=work, env=dict(os.environ, PYTHONPATH=ROOT))
  torch_side = json.loads(out.stdout.strip().splitlines()[-1])
  diff = float(np.abs(np.load(os.path.join(work, "torch.npy")) - want).max())
  print(machine())
  print(f"{a.steps} Euler-ancestral steps at 32 px, one image; max |torch - ours| = {diff:.2e}; "
        f"same text: {torch_side['text'] == text}")
  print(f"{'':34s} {'torch s':>9s} {'ours s':>9s} {'torch/ours':>10s}")
  for name, tt, to in (("whole process (load, first edit)", torch_side["process"], ours_process),
                       ("second edit, warm", torch_side["warm"], ours_warm)):
    print(f"{name:34s} {tt:9.2f} {to:9.2f} {tt / to:10.2f}")


if __name__ == "__main__":
  main()
