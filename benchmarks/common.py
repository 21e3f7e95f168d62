"""Shared helpers for the benchmark scripts: a median timer and a line naming the machine."""

import os
import platform
import statistics
import time


def timeit(fn, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls, after one warm-up (compile) call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> str:
  import jax
  import torch
  return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")


def table(rows, width: int = 46) -> None:
  print(f"{'what':{width}s} {'torch s':>9s} {'ours s':>9s} {'torch/ours':>10s}")
  for name, tt, to in rows:
    print(f"{name:{width}s} {tt:9.4f} {to:9.4f} {tt / to:10.2f}")
