"""The one attention function every model in mgie_jax goes through."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def dot_product_attention(q, k, v, *, mask=None, bias=None, scale=None, implementation: str = "xla"):
  """Scaled dot-product attention over [batch, length, heads, head_dim] tensors.

  `k`/`v` may have fewer heads than `q` (grouped-query attention); `mask` is a
  boolean array broadcastable to [batch, heads, q_len, kv_len], True = attend.
  `implementation` is a config value: "xla" runs everywhere, "cudnn" asks for
  the fused cuDNN kernel on NVIDIA GPUs, "auto" lets JAX pick. `bias` (added to the scores,
  broadcastable like `mask`) and `scale` (default 1/sqrt(head_dim)) serve T5.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  impl = None if implementation == "auto" else implementation
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)


def empty_kv_cache(layers: int, batch: int, max_length: int, heads: int, head_dim: int, dtype) -> dict:
  """The functional decoding cache our decoders share: k/v [layers, B, max_length, heads, head_dim],
  per-slot validity, and the next write index."""
  shape = (layers, batch, max_length, heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "valid": jnp.zeros((batch, max_length), bool), "index": jnp.zeros((), jnp.int32)}


def causal_padding_mask(query_slots, key_valid):
  """Boolean [batch, 1, q, kv] mask: key slot j is visible to query slot i iff j <= i and key j is real.

  query_slots: int [q] or [batch, q] absolute slot of each query (cache index + offset).
  key_valid: bool [batch, kv], False for padding and not-yet-written cache slots.
  """
  key_slots = jnp.arange(key_valid.shape[-1])
  if query_slots.ndim == 1:
    query_slots = query_slots[None]
  causal = key_slots[None, None, :] <= query_slots[:, :, None]
  return (causal & key_valid[:, None, :])[:, None]
