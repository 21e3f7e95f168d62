"""Ahead-of-time compile of one edit for any devices (a TPU slice included, without a TPU): memory
per device and the XLA cost model's seconds per image, piece by piece.

An edit is a prefill of the prompt (CLIP features and the 256 image tokens included), N - 1 greedy
decode steps with the KV cache, the [IMG] pass with the edit head, a VAE encode, S sampler steps
(one UNet call on the three guidance branches each) and a VAE decode. Each piece is compiled on
its own, with the whole model's weights as arguments, so the memory is what holding the model
and running that piece needs; the cost model prices loop bodies once, so the decode step and the
sampler step are compiled as single steps and multiplied by N - 1 and S. Layer stacks are traced
unrolled (`unrolled_layers`) so every layer is priced.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.core.compiled import compiler_numbers
from mgie_jax.diffusion.guidance import guided_eps
from mgie_jax.models.layers import unrolled_layers
from mgie_jax.run import model as model_lib


def _abstract_params(placed, dtype):
  """Every parameter as a ShapeDtypeStruct on its sharding, floating ones in the inference dtype."""
  def cast(x, sh):
    return jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=sh)
  pure = lambda s: nnx.to_pure_dict(s)
  return (jax.tree.map(cast, pure(placed.parts.trainable_template), placed.trainable_sh),
          jax.tree.map(cast, pure(placed.parts.frozen_template), placed.frozen_sh))


def _numbers(compiled) -> dict:
  n = compiler_numbers(compiled)
  if "cost_model_s" in n:
    n["seconds"] = n.pop("cost_model_s")
  return n


def edit_pieces(placed, cfg, *, resolution: int, batch: int, new_tokens: int, steps: int, prompt_length: int,
                dtype: str = "bfloat16"):
  """(abstract trainable params, abstract frozen params, pieces): each piece is (name, calls per edit,
  fn(params, frozen, *inputs), abstract inputs), all on `placed`'s mesh: what
  compile_edit prices and a benchmark on an accelerator runs."""
  params, frozen = _abstract_params(placed, jnp.dtype(dtype))
  rep = jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec())
  arr = lambda shape, dt=jnp.dtype(dtype): jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  total = prompt_length + new_tokens
  clip = cfg.llava.vision.image_size
  factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
  latent = (batch, resolution // factor, resolution // factor, cfg.vae.latent_channels)
  cond = (batch, cfg.edit_head.num_queries, cfg.edit_head.out_dim)

  def model(p, f):
    return placed.parts.merge(p, f)

  def prefill(p, f, ids, mask, pixels):
    m = model(p, f).mllm
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = m(ids, attention_mask=mask, positions=positions, cache=m.init_cache(ids.shape[0], total),
            pixel_values=pixels)
    return jnp.argmax(out.logits[:, -1], -1), out.cache

  def decode_step(p, f, tok, cache, pos):
    m = model(p, f).mllm
    o = m(tok[:, None], attention_mask=jnp.ones((tok.shape[0], 1), bool), positions=pos[:, None], cache=cache)
    return jnp.argmax(o.logits[:, -1], -1), o.cache

  def img_pass(p, f, ids, mask, pixels):
    mg = model(p, f)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = mg.mllm(ids, pixels, attention_mask=mask, positions=positions)
    return mg.conditions(out.hidden_states, ids)

  def encode(p, f, images):
    return model(p, f).vae.encode(images).mode()

  def sampler_step(p, f, x, t, image_latents, u, null):
    mg = model(p, f)
    return x - 0.01 * guided_eps(mg.unet, x, t, image_latents, u, null, 7.5, 1.5).astype(x.dtype)

  def decode(p, f, x):
    return model(p, f).vae.decode(x)

  ids, mask = arr((batch, prompt_length), jnp.int32), arr((batch, prompt_length), jnp.bool_)
  pixels = arr((batch, clip, clip, 3))
  with jax.set_mesh(placed.mesh):
    cache = jax.eval_shape(lambda *a: prefill(*a)[1], params, frozen, ids, mask, pixels)
  cache = jax.tree.map(lambda x: arr(x.shape, x.dtype), cache)
  full = (batch, total + 8)
  pieces = (
      ("prefill", 1, prefill, (ids, mask, pixels)),
      ("decode step", new_tokens - 1, decode_step, (arr((batch,), jnp.int32), cache, arr((batch,), jnp.int32))),
      ("[IMG] pass + edit head", 1, img_pass, (arr(full, jnp.int32), arr(full, jnp.bool_), pixels)),
      ("VAE encode", 1, encode, (arr((batch, resolution, resolution, 3)),)),
      ("sampler step (3 UNet branches)", steps, sampler_step,
       (arr(latent), arr((), jnp.int32), arr(latent), arr(cond), arr(cond))),
      ("VAE decode", 1, decode, (arr(latent),)),
  )
  return params, frozen, pieces


def compile_edit(c, built, devices, *, resolution: int, batch: int, new_tokens: int, steps: int,
                 prompt_length: int, dtype: str = "bfloat16") -> dict:
  """Compile the edit's pieces for `devices`; returns per piece its count per edit and the
  compiler's numbers, and the totals per image."""
  placed = model_lib.place(c, built, devices)
  params, frozen, pieces = edit_pieces(placed, built.config, resolution=resolution, batch=batch,
                                       new_tokens=new_tokens, steps=steps, prompt_length=prompt_length, dtype=dtype)
  rows = []
  with jax.set_mesh(placed.mesh), unrolled_layers():
    for name, count, fn, inputs in pieces:
      t0 = time.time()
      row = dict(piece=name, count=count)
      try:     # every weight an argument: the memory of a server holding the whole model
        compiled = jax.jit(fn, keep_unused=True).lower(params, frozen, *inputs).compile()
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        # Does not fit beside all the weights: say so, and price it with only its own weights.
        row["does_not_fit"] = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
        compiled = jax.jit(fn).lower(params, frozen, *inputs).compile()
      rows.append(dict(row, compile_s=round(time.time() - t0, 1), **_numbers(compiled)))
  out = dict(devices=len(devices), device_kind=devices[0].device_kind, batch=batch, resolution=resolution,
             new_tokens=new_tokens, steps=steps, prompt_length=prompt_length, dtype=dtype, pieces=rows)
  out["fits"] = not any("does_not_fit" in r for r in rows)
  if all("argument_gib" in r for r in rows):
    out["weights_gib"] = max(r["argument_gib"] for r in rows)   # exact where every piece fit
    out["peak_gib"] = max(r["argument_gib"] + r["temp_gib"] + r["output_gib"] - r["alias_gib"] for r in rows)
  if all("seconds" in r for r in rows):
    out["seconds_per_edit"] = sum(r["count"] * r["seconds"] for r in rows)
    out["images_per_s"] = batch / out["seconds_per_edit"]
  out["tflops_per_edit"] = sum(r["count"] * r["flops"] for r in rows) * len(devices) / 1e12
  return out


def report(r: dict, topology: str) -> str:
  lines = [f"{topology}: an edit of {r['batch']} image(s) at {r['resolution']} px, {r['dtype']}: prompt "
           f"{r['prompt_length']} tokens, {r['new_tokens']} new tokens, {r['steps']} sampler steps "
           f"({r['devices']} x {r['device_kind']})"]
  for p in r["pieces"]:
    s = f"{p['seconds'] * 1e3:9.2f} ms" if "seconds" in p else "        n/a"
    lines.append(f"  {p['piece']:32s} x{p['count']:<4d} {s}   {p['flops'] / 1e9:10.1f} GFLOP"
                 f"   temporaries {p.get('temp_gib', float('nan')):.2f} GiB   compile {p['compile_s']:.0f} s")
  for p in r["pieces"]:
    if "does_not_fit" in p:
      lines.append(f"  DOES NOT FIT: {p['piece']} beside all the weights ({p['does_not_fit']}); priced "
                   "with only its own weights")
  if "peak_gib" in r and r["fits"]:
    lines.append(f"  memory per device: weights {r['weights_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB")
  if "seconds_per_edit" in r:
    lines.append(f"  cost model: {r['seconds_per_edit']:.3f} s per edit, {r['images_per_s']:.2f} images/s "
                 f"({r['tflops_per_edit']:.1f} TFLOP; XLA's estimate, not a measurement)")
  else:
    lines.append(f"  {r['tflops_per_edit']:.2f} TFLOP per edit (this backend gives no cost-model time)")
  return "\n".join(lines)
