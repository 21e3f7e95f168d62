"""MGIE's edit head: the hidden states of the 8 visual tokens -> a 77x768 diffusion condition.

Equivalent of the official `EditMapper` on PyTorch `nn.Transformer(batch_first=True,
norm_first=True)`: Linear(4096->512) on h + e, 4 pre-LN encoder and 4 pre-LN decoder layers
(width 512, 4 heads, FFN 2048 ReLU, no positional encodings, no masks, final LayerNorms after
each stack), 77 learned queries as the decoder input, then Linear(512->768).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models import layers
from mgie_jax.models.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class EditHeadConfig:
  llm_dim: int = 4096
  width: int = 512
  heads: int = 4
  ffn: int = 2048
  encoder_layers: int = 4
  decoder_layers: int = 4
  num_queries: int = 77
  out_dim: int = 768
  eps: float = 1e-5
  query_std: float = 1.0       # the release: N(0, 1); a small value lets a from-scratch model's
                               # condition follow its input early (the tiny recipe)
  dtype: str = "float32"
  param_dtype: str = "float32"


class PackedAttention(nnx.Module):
  """nn.MultiheadAttention: q/k/v packed in one in_proj (rows q, k, v in PyTorch), out_proj."""

  def __init__(self, cfg: EditHeadConfig, rngs):
    d = cfg.width
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, std=None)
    self.heads = cfg.heads
    self.in_proj = layers.linear(d, 3 * d, ("embed", "heads"), **kw)
    self.out_proj = layers.linear(d, d, ("heads", "embed"), **kw)

  def __call__(self, x, memory=None):
    b, l, d = x.shape
    w, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
    memory = x if memory is None else memory
    q = x @ w[:, :d].astype(x.dtype) + bias[:d].astype(x.dtype)
    kv = memory @ w[:, d:].astype(x.dtype) + bias[d:].astype(x.dtype)
    k, v = kv[..., :d], kv[..., d:]
    split = lambda y: y.reshape(b, y.shape[1], self.heads, d // self.heads)
    out = dot_product_attention(split(q), split(k), split(v))
    return self.out_proj(out.reshape(b, l, d))


class TransformerLayer(nnx.Module):
  """Pre-LN encoder layer (self-attention, FFN) or decoder layer (+ cross-attention)."""

  def __init__(self, cfg: EditHeadConfig, rngs, decoder: bool):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    ln = lambda: layers.layer_norm(cfg.width, "norm", eps=cfg.eps, rngs=rngs, **kw)
    self.decoder = decoder
    self.self_attn = PackedAttention(cfg, rngs)
    self.norm1, self.norm2 = ln(), ln()
    if decoder:
      self.multihead_attn = PackedAttention(cfg, rngs)
      self.norm3 = ln()
    self.linear1 = layers.linear(cfg.width, cfg.ffn, ("embed", "mlp"), rngs=rngs, std=None, **kw)
    self.linear2 = layers.linear(cfg.ffn, cfg.width, ("mlp", "embed"), rngs=rngs, std=None, **kw)

  def __call__(self, x, memory=None):
    x = x + self.self_attn(self.norm1(x))
    if self.decoder:
      x = x + self.multihead_attn(self.norm2(x), memory)
    ff_norm = self.norm3 if self.decoder else self.norm2
    return x + self.linear2(jax.nn.relu(self.linear1(ff_norm(x))))


class EditHead(nnx.Module):

  def __init__(self, cfg: EditHeadConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.llm2hid = layers.linear(cfg.llm_dim, cfg.width, ("embed", "mlp"), rngs=rngs, std=None, **kw)
    self.query = layers.param(cfg.query_std * jax.random.normal(rngs.params(), (1, cfg.num_queries, cfg.width),
                                                               cfg.param_dtype), (None, None, "norm"))
    self.encoder_layers = nnx.List([TransformerLayer(cfg, rngs, False) for _ in range(cfg.encoder_layers)])
    self.encoder_norm = layers.layer_norm(cfg.width, "norm", eps=cfg.eps, rngs=rngs, **kw)
    self.decoder_layers = nnx.List([TransformerLayer(cfg, rngs, True) for _ in range(cfg.decoder_layers)])
    self.decoder_norm = layers.layer_norm(cfg.width, "norm", eps=cfg.eps, rngs=rngs, **kw)
    self.hid2feat = layers.linear(cfg.width, cfg.out_dim, ("mlp", "embed"), rngs=rngs, std=None, **kw)

  def __call__(self, hidden, embeds):
    """hidden [B, 8, llm_dim] ([IMG] window states), embeds [8, llm_dim] or [B, 8, llm_dim] -> [B, 77, out_dim]."""
    x = self.llm2hid((hidden + embeds).astype(self.config.dtype))
    for layer in self.encoder_layers:
      x = layer(x)
    memory = self.encoder_norm(x)
    q = jnp.broadcast_to(self.query[...].astype(x.dtype), (x.shape[0],) + self.query.shape[1:])
    for layer in self.decoder_layers:
      q = layer(q, memory)
    return self.hid2feat(self.decoder_norm(q))
