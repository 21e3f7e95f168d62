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


def same_pages_as_the_commands() -> None:
  """Re-run this script as `python -m mgie_jax.<command>` runs (huge pages for large host buffers,
  mgie_jax/core/hugepages.py), torch and ours alike; call it before the heavy imports."""
  from mgie_jax.core import hugepages
  hugepages.reexec_with_huge_pages(any_program=True)


def machine() -> str:
  import jax
  import torch
  from mgie_jax.core import hugepages
  pages = "2 MiB pages" if hugepages.TUNABLE in os.environ.get("GLIBC_TUNABLES", "") else "4 KiB pages"
  return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {pages}")


def table(rows, width: int = 46) -> None:
  print(f"{'what':{width}s} {'torch s':>9s} {'ours s':>9s} {'torch/ours':>10s}")
  for name, tt, to in rows:
    print(f"{name:{width}s} {tt:9.4f} {to:9.4f} {tt / to:10.2f}")
