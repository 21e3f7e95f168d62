"""Where the UNet step's time goes on CPU, per op class: group norm, 3x3 convolution, 1x1 projection
and self-attention, forward + backward, torch against ours at the benchmark UNet's level-1 shapes.

  python benchmarks/bench_unet_ops.py [--batch 2 --side 32 --channels 64 --heads 2]

Defaults are bench_diffusion.py's first level (latents 32x32, 64 channels, 2 heads of 32). Each op
is the gradient of sum(op(x)^2) with respect to its input and weights, fp32, median of 20 calls
after a warm-up. Ratio torch / ours (>1: we are faster).
"""

import argparse

from common import same_pages_as_the_commands  # noqa: E402

same_pages_as_the_commands()      # before torch and JAX start

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from common import machine, timeit

from mgie_jax.models.attention import dot_product_attention


def ours_grad(module):
  graphdef, state = nnx.split(module)
  f = jax.jit(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2), argnums=(0, 1)))
  return lambda x: jax.block_until_ready(f(state, x))


def torch_grad(module, x):
  def run():
    module.zero_grad(set_to_none=True)
    (module(x) ** 2).sum().backward()
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--side", type=int, default=32)
  p.add_argument("--channels", type=int, default=64)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=20)
  a = p.parse_args()
  b, s, c = a.batch, a.side, a.channels
  x = np.random.default_rng(0).standard_normal((b, s, s, c), np.float32)
  tx = torch.tensor(x.transpose(0, 3, 1, 2)).contiguous().requires_grad_()
  jx = jnp.asarray(x)
  rngs = nnx.Rngs(0)
  rows = []
  for name, ours, theirs in (
      ("group norm (32 groups)", nnx.GroupNorm(c, num_groups=32, epsilon=1e-5, rngs=rngs), torch.nn.GroupNorm(32, c)),
      ("3x3 convolution", nnx.Conv(c, c, (3, 3), padding=1, rngs=rngs), torch.nn.Conv2d(c, c, 3, padding=1)),
      ("1x1 projection", nnx.Linear(c, c, rngs=rngs), torch.nn.Conv2d(c, c, 1))):
    rows.append((f"{name}, {b}x{c}x{s}x{s}", timeit(torch_grad(theirs, tx), a.repeats),
                 timeit(lambda f=ours_grad(ours): f(jx), a.repeats)))
  # Self-attention over the s*s tokens, the UNet's heads: our default ("auto": blocked here).
  h = a.heads
  q = np.random.default_rng(1).standard_normal((b, s * s, h, c // h), np.float32)
  tq = torch.tensor(q).transpose(1, 2).contiguous().requires_grad_()

  def t_attn():
    tq.grad = None
    (torch.nn.functional.scaled_dot_product_attention(tq, tq, tq) ** 2).sum().backward()

  f = jax.jit(jax.grad(lambda q: jnp.sum(dot_product_attention(q, q, q) ** 2)))
  jq = jnp.asarray(q)
  rows.append((f"self-attention, {s * s} tokens x {h} x {c // h}", timeit(t_attn, a.repeats),
               timeit(lambda: jax.block_until_ready(f(jq)), a.repeats)))
  print(machine())
  print("| op, shape | torch ms | ours ms | torch/ours |")
  print("|---|---|---|---|")
  for name, t, o in rows:
    print(f"| {name} | {t * 1e3:.3f} | {o * 1e3:.3f} | {t / o:.2f} |")


if __name__ == "__main__":
  main()
