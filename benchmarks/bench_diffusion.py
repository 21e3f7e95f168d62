"""Time our jit-compiled UNet training step (forward + backward) and VAE encode against diffusers on CPU.

  python benchmarks/bench_diffusion.py [--width 64 --batch 2 --latent 32 --image 256]

Both sides use the same random weights (saved by diffusers, read by our loader), fp32.
The UNet step is MSE to a random target and its gradient w.r.t. all UNet parameters
(no optimizer update, identical work on both sides). Prints median seconds per call
and the ratio torch / ours (>1: we are faster).
"""

import argparse
import os
import tempfile

from common import same_pages_as_the_commands  # noqa: E402

same_pages_as_the_commands()      # before torch and JAX start

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from common import machine, table, timeit

from mgie_jax.models import AutoencoderKL, UNet2DConditionModel
from mgie_jax.convert import from_pretrained


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--width", type=int, default=64, help="first block width (SD-1.5: 320)")
  p.add_argument("--heads", type=int, default=2,
                 help="attention heads; 2 at width 64 gives head dims 32-128, like SD-1.5's 40-160")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--latent", type=int, default=32, help="latent side (MGIE trains at 256 px: 32)")
  p.add_argument("--image", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--attention", default="auto,xla", help="our UNet's attention_impl values to time, comma-separated")
  p.add_argument("--profile", default="", help="write a JAX profile of one UNet step (first --attention value) here "
                 "and print where its time goes per op class")
  a = p.parse_args()
  torch.manual_seed(0)
  w = a.width
  unet_t = diffusers.UNet2DConditionModel(
      sample_size=a.latent, in_channels=8, out_channels=4, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
      layers_per_block=2, cross_attention_dim=768, attention_head_dim=a.heads, norm_num_groups=32)
  vae_t = diffusers.AutoencoderKL(
      block_out_channels=(w, 2 * w, 4 * w, 4 * w), layers_per_block=2, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
  with tempfile.TemporaryDirectory() as d:
    unet_t.save_pretrained(os.path.join(d, "unet"))
    vae_t.save_pretrained(os.path.join(d, "vae"))
    unets = {impl: from_pretrained(UNet2DConditionModel, os.path.join(d, "unet"), attention_impl=impl)
             for impl in a.attention.split(",")}
    vae = from_pretrained(AutoencoderKL, os.path.join(d, "vae"))
  n_params = sum(p.numel() for p in unet_t.parameters())

  rng = np.random.default_rng(0)
  x = rng.normal(size=(a.batch, 8, a.latent, a.latent)).astype(np.float32)
  target = rng.normal(size=(a.batch, 4, a.latent, a.latent)).astype(np.float32)
  ctx = rng.normal(size=(a.batch, 77, 768)).astype(np.float32)
  t = np.array([10, 900][:a.batch] * (a.batch // 2 or 1))[:a.batch]

  def torch_step():
    unet_t.zero_grad(set_to_none=True)
    out = unet_t(torch.as_tensor(x), torch.as_tensor(t), encoder_hidden_states=torch.as_tensor(ctx)).sample
    loss = torch.nn.functional.mse_loss(out, torch.as_tensor(target))
    loss.backward()
    return loss

  jx = [jnp.asarray(v) for v in (x.transpose(0, 2, 3, 1), t, ctx, target.transpose(0, 2, 3, 1))]
  t_torch = timeit(torch_step, a.repeats)
  rows = []
  for impl, unet in unets.items():
    graphdef, state = nnx.split(unet)

    @jax.jit
    def jax_step(state, x, t, ctx, target, graphdef=graphdef):
      def loss(s):
        return jnp.mean((nnx.merge(graphdef, s)(x, t, ctx) - target) ** 2)
      return jax.value_and_grad(loss)(state)

    rows.append((f"UNet train step (fwd+bwd), {n_params / 1e6:.1f}M params, attention {impl}", t_torch,
                 timeit(lambda: jax.block_until_ready(jax_step(state, *jx)), a.repeats)))
    if a.profile and len(rows) == 1:
      from profile_summary import print_summary
      with jax.profiler.trace(a.profile, create_perfetto_trace=True):
        jax.block_until_ready(jax_step(state, *jx))
      hlo = jax_step.lower(state, *jx).compile().as_text()
      with open(os.path.join(a.profile, "unet_step.hlo.txt"), "w") as f:
        f.write(hlo)
      print_summary(a.profile, hlo, title=f"our UNet step ({impl})")

  img = rng.uniform(-1, 1, size=(a.batch, 3, a.image, a.image)).astype(np.float32)
  vg, vs = nnx.split(vae)
  encode = jax.jit(lambda s, im: nnx.merge(vg, s).encode(im).mean)
  with torch.inference_mode():
    t_torch = timeit(lambda: vae_t.encode(torch.as_tensor(img)).latent_dist.mean, a.repeats)
  t_ours = timeit(lambda: encode(vs, jnp.asarray(img.transpose(0, 2, 3, 1))).block_until_ready(), a.repeats)
  rows.append((f"VAE encode {a.image}px", t_torch, t_ours))

  print(machine())
  print(f"config: UNet blocks {(w, 2 * w, 4 * w, 4 * w)}, {a.heads} heads, 2 layers/block, cross-attn 768x77, "
        f"latents {a.latent}x{a.latent}x8, batch {a.batch}; VAE same widths; fp32")
  table(rows, width=64)


if __name__ == "__main__":
  main()
