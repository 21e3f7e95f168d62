"""Loader throughput: examples/s (and per CPU core) of the grain pipeline at 256 px.

  python benchmarks/bench_loader.py [--data_dir BUILT_DATASET] [--threads 8 --workers 0 --batches 30]

Without --data_dir it builds a synthetic dataset at 512 px (IPr2Pr's image size) in a temp
folder. Every example is JPEG-decoded twice, center-cropped, resized 512 -> 256 and to the
224 px CLIP view, and tokenised with the MGIE template (256 image tokens, length 512).
"""

import argparse
import os
import tempfile
import time

from data_pipelines import synthetic
from data_pipelines.ipr2pr import build
from data_pipelines.loader import LoaderConfig, make_dataset


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir")
  p.add_argument("--tokenizer")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--threads", type=int, default=8)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--batches", type=int, default=30)
  a = p.parse_args()
  tmp = None
  if a.data_dir is None:
    tmp = tempfile.TemporaryDirectory()
    src = os.path.join(tmp.name, "src")
    synthetic.write_dataset(src, prompts=200, seeds=2, size=512)
    a.data_dir = build(src, os.path.join(tmp.name, "tfds"), "folder",
                       os.path.join(src, "expressive.json")).data_dir
    a.tokenizer = os.path.join(src, "tokenizer")
  cfg = LoaderConfig(data_dir=a.data_dir, batch_size=a.batch, tokenizer=a.tokenizer,
                     num_threads=a.threads, worker_count=a.workers, prefetch=2 * a.batch)
  it = iter(make_dataset(cfg))
  next(it)                                   # start-up: open files, spawn workers, warm caches
  t0 = time.perf_counter()
  for _ in range(a.batches):
    next(it)
  dt = time.perf_counter() - t0
  n = a.batches * a.batch
  cores = os.cpu_count()
  print(f"{n} examples in {dt:.2f} s: {n / dt:.1f} examples/s, {n / dt / cores:.1f} per core "
        f"({cores} cores, {a.threads} threads, {a.workers} worker processes, batch {a.batch}, 256 px)")


if __name__ == "__main__":
  main()
