"""Attention at the UNet's shapes on CPU: torch's fused SDPA against ours ("xla" one-shot and
"blocked"; "auto", the default, is "blocked" at these shapes on CPU).

  python benchmarks/bench_attention.py [--batch 2 --repeats 5]

Self-attention of SD-1.5's UNet levels at 256 and 512 px (tokens x heads x head_dim: 1024 x 8 x 40,
4096 x 8 x 40, 256 x 8 x 80) and its cross-attention to the 77-token condition; fp32, the same random
inputs on both sides. Forward, and forward + backward (the gradient of <out, cotangent> with respect
to q, k and v). Prints median seconds per call and the ratio torch / ours (>1: we are faster).
"""

import argparse

from common import same_pages_as_the_commands  # noqa: E402

same_pages_as_the_commands()      # before torch and JAX start

import jax
import numpy as np
import torch

from common import machine, timeit

from mgie_jax.models.attention import dot_product_attention

SHAPES = (("level 1 self, 256 px", 1024, 1024, 8, 40), ("level 2 self, 256 px", 256, 256, 8, 80),
          ("level 1 self, 512 px", 4096, 4096, 8, 40), ("level 1 cross, 256 px", 1024, 77, 8, 40))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  print(machine())
  print("| shape (q x kv x heads x head_dim) | pass | torch SDPA s | xla s | blocked s | torch/xla | torch/blocked |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for name, lq, lk, h, d in SHAPES:
    q = rng.standard_normal((a.batch, lq, h, d), np.float32)
    k, v = (rng.standard_normal((a.batch, lk, h, d), np.float32) for _ in range(2))
    do = rng.standard_normal(q.shape, np.float32)
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    tdo = torch.tensor(do).transpose(1, 2).contiguous()

    def torch_fwd():
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    def torch_bwd():
      o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
      torch.autograd.grad(o, (tq, tk, tv), tdo)

    times = {"torch": (timeit(torch_fwd, a.repeats), timeit(torch_bwd, a.repeats))}
    for impl in ("xla", "blocked"):
      fwd = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, implementation=impl))
      bwd = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(
          lambda q, k, v: dot_product_attention(q, k, v, implementation=impl), q, k, v)[1](do))
      jq, jk, jv, jdo = (jax.device_put(x) for x in (q, k, v, do))
      times[impl] = (timeit(lambda: fwd(jq, jk, jv).block_until_ready(), a.repeats),
                     timeit(lambda: jax.block_until_ready(bwd(jq, jk, jv, jdo)), a.repeats))
    for i, what in enumerate(("forward", "forward + backward")):
      t, x, b = times["torch"][i], times["xla"][i], times["blocked"][i]
      print(f"| {name}: {lq} x {lk} x {h} x {d} | {what} | {t:.4f} | {x:.4f} | {b:.4f} | {t / x:.2f} | {t / b:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
