"""Model FLOPs per training sample, for TFLOP/s and MFU (docs/design.md, "Sharding and speed").

LLaMA: analytic (matmuls and attention; frozen blocks cost forward + activation gradients,
i.e. 2x forward; the trained lm_head 3x). CLIP, VAE and UNet: the FLOPs XLA counts in their
forward graphs (`cost_analysis` of the lowered, un-rematerialised forward), times the passes
the step makes: UNet 3x (forward, input and weight gradients), CLIP and VAE 1x (frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models.layers import unrolled_layers

PEAK_BF16_TFLOPS = {  # dense, per chip
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def llama_flops(cfg, tokens: int) -> float:
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  kv = cfg.num_key_value_heads * cfg.head_dim
  q = cfg.num_attention_heads * cfg.head_dim
  per_token_layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)
  attention = 2 * 2 * tokens * tokens * q * n            # QK^T and AV over the sequence
  forward = per_token_layer * n * tokens + attention
  lm_head = 2 * d * cfg.vocab_size * tokens
  return 2 * forward + 3 * lm_head


def _forward_flops(fn, module, *args) -> float:
  graphdef, state = nnx.split(module)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with unrolled_layers():     # XLA counts a scanned layer stack's body once
    cost = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a)).lower(abstract, *args).cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float((cost or {}).get("flops", 0.0))


def mgie_flops_per_sample(model, seq_len: int, resolution: int, text_length: int = 0,
                          frozen_features: bool = False) -> float:
  """Model FLOPs of one training sample (one forward + backward of the joint loss). For the
  text-only baseline, the text encoder's (3x: it is trained) instead of the MLLM's. With
  `frozen_features` (a cache), CLIP and the VAE encoder do not run in the step."""
  cfg = model.config
  if hasattr(cfg, "llava"):
    v = cfg.llava.vision
    f = llama_flops(cfg.llava.text, seq_len)
    pix = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    if not frozen_features:
      f += _forward_flops(lambda m, x: m(x, output_hidden_states=True).last_hidden_state,
                          model.mllm.vision_tower, pix)
    ctx_len, ctx_dim = cfg.edit_head.num_queries, cfg.unet.cross_attention_dim
  else:
    ids = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
    f = 3 * _forward_flops(lambda m, i: m(i)[0], model.text_encoder, ids)
    ctx_len, ctx_dim = text_length, cfg.unet.cross_attention_dim
  img = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  if not frozen_features:
    f += 2 * _forward_flops(lambda m, x: m.encode(x).mean, model.vae, img)
  factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
  lat = jax.ShapeDtypeStruct((1, resolution // factor, resolution // factor, cfg.unet.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, ctx_len, ctx_dim), jnp.float32)
  f += 3 * _forward_flops(lambda m, x, c: m(x, jnp.zeros((1,), jnp.int32), c), model.unet, lat, ctx)
  return f
