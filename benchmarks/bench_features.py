"""Training steps/s of the tiny LoRA recipe with and without the frozen-feature cache (CPU).

  python benchmarks/bench_features.py --steps 40

Builds the small synthetic dataset in a temporary folder, writes its cache with the command users
run (`python -m data_pipelines.features`, timed), then times the trainer's own step on the loader's
batches both ways, in one process, one after the other: the median of `--steps` steps after
`--warmup` (compile included in neither), and the loader's wait per step beside it. The models are
the tiny recipe's (configs/tiny_lora.py, 64 px, a seeded random VAE); one device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--warmup", type=int, default=5)
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from common import machine
  from saved_runs import lora_run_on, write_data

  root = tempfile.mkdtemp(prefix="bench_features_")
  data = write_data(os.path.join(root, "data"))
  cache = os.path.join(root, "cache")
  flags = ["--config=configs/tiny_lora.py", f"--config.data.dir={data[0]}", f"--config.data.tokenizer={data[1]}",
           "--config.pretrained.vae="]
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "data_pipelines.features", *flags, f"--out={cache}"], cwd=ROOT, check=True,
                 capture_output=True)
  cache_s = time.time() - t0
  print(machine())
  print(f"cache command: {cache_s:.1f} s for the train split (start-up and compile included)")
  print(f"{'batches from':14s} {'step s':>8s} {'steps/s':>8s} {'loader wait s':>14s}")
  for name, features in (("images", ""), ("the cache", cache)):
    _, state, frozen, loader, step = lora_run_on(data, features)
    steps, waits = [], []
    for i in range(a.warmup + a.steps):
      t0 = time.perf_counter()
      batch = next(loader)
      batch.pop("key")
      t1 = time.perf_counter()
      state, metrics = step(state, frozen, batch)
      float(metrics["loss"])
      t2 = time.perf_counter()
      if i >= a.warmup:
        steps.append(t2 - t1)
        waits.append(t1 - t0)
    s = statistics.median(steps)
    print(f"{name:14s} {s:8.4f} {1 / s:8.1f} {statistics.median(waits):14.4f}")


if __name__ == "__main__":
  main()
