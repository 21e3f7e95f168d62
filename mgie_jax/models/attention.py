"""The one attention function every model in mgie_jax goes through."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax._src import mesh as mesh_lib   # get_abstract_mesh: the platform being compiled for

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn")
QUERY_BLOCK = 128          # queries per block of "blocked": its scores, [B, H, 128, kv], stay in cache
BACKWARD_QUERY_BLOCK = 128
BLOCKED_MIN_QUERIES = 512  # below this XLA's one-shot attention is as fast on CPU


def dot_product_attention(q, k, v, *, mask=None, bias=None, scale=None, implementation: str = "auto"):
  """Scaled dot-product attention over [batch, length, heads, head_dim] tensors.

  `k`/`v` may have fewer heads than `q` (grouped-query attention); `mask` is a
  boolean array broadcastable to [batch, heads, q_len, kv_len], True = attend.
  `bias` (added to the scores, broadcastable like `mask`) and `scale` (default
  1/sqrt(head_dim)) serve T5. `implementation` is a config value: "xla" is XLA's one-shot
  attention, "cudnn" asks for the fused cuDNN kernel on NVIDIA GPUs, "blocked" is
  `blocked_attention` (no mask or bias), and "auto" (the default) is "blocked" where that wins
  (compiling for CPU, no mask or bias, at least BLOCKED_MIN_QUERIES queries: the UNet's
  self-attention) and "xla" otherwise, so GPU and TPU programs are those of "xla".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  plain = mask is None and bias is None and k.shape[2] == q.shape[2]
  if implementation == "blocked" and not plain:
    raise ValueError("blocked attention takes no mask or bias and equal query/key heads: use \"auto\" or \"xla\"")
  if implementation == "auto":
    long_enough = q.shape[1] >= BLOCKED_MIN_QUERIES
    implementation = "blocked" if plain and long_enough and _target_platform() == "cpu" else "xla"
  if implementation == "blocked":
    return blocked_attention(q, k, v, scale=scale)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)


def _target_platform() -> str:
  """The platform the enclosing program is compiled for: the mesh's (an AOT compile for a TPU
  slice from a CPU host is a TPU program), else the default backend's."""
  device = getattr(mesh_lib.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def blocked_attention(q, k, v, *, scale=None):
  """Attention computed QUERY_BLOCK queries at a time, each block's softmax in float32, so that
  no [q_len, kv_len] score matrix is ever materialised: on CPU the one-shot version is bound by
  writing and re-reading those scores (64 MB per SD-1.5 level-1 layer at batch 2). The backward
  pass recomputes each block's scores from the saved log-sum-exp (as flash attention does)."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)           # [B, H, L, D]: batched matmuls need no copies
  return heads_first(_blocked(heads_first(q), heads_first(k), heads_first(v), scale))


def _split_blocks(x, block):
  """[B, H, L, ...] -> [L_pad / block, B, H, block, ...] (zero-padded queries are cut off later)."""
  n = x.shape[2]
  pad = -n % block
  x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)) if pad else x
  x = x.reshape(*x.shape[:2], (n + pad) // block, block, *x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _join_blocks(x, n):
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :n]


def _scores(qb, k, scale):
  return jnp.einsum("bhqd,bhkd->bhqk", qb, k, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, scale):
  block = min(QUERY_BLOCK, q.shape[2])

  def one(qb):
    s = _scores(qb, k, scale)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.astype(q.dtype), (m + jnp.log(l))[..., 0]          # lse: [B, H, block]

  o, lse = jax.lax.map(one, _split_blocks(q, block))
  return _join_blocks(o, q.shape[2]), _join_blocks(lse, q.shape[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q, k, v, scale):
  return _forward(q, k, v, scale)[0]


def _blocked_fwd(q, k, v, scale):
  o, lse = _forward(q, k, v, scale)
  return o, (q, k, v, o, lse)


def _blocked_bwd(scale, res, do):
  q, k, v, o, lse = res
  block = min(BACKWARD_QUERY_BLOCK, q.shape[2])
  # delta_i = sum_d do_i * o_i: the softmax Jacobian's row term, one number per query.
  delta = jnp.einsum("bhqd,bhqd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))

  def one(carry, xs):
    dk, dv = carry
    qb, dob, lse_b, delta_b = xs
    p = jnp.exp(_scores(qb, k, scale) - lse_b[..., None])                  # [B, H, block, kv]
    dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", dob, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_b[..., None]) * scale
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
    return (dk, dv), dq.astype(q.dtype)

  zeros = jnp.zeros(k.shape, jnp.float32)
  xs = tuple(_split_blocks(x, block) for x in (q, do, lse, delta))
  (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), xs)
  return _join_blocks(dq, q.shape[2]), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


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
