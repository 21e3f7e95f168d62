"""T5 v1.1 / Flan-T5 encoder-decoder, a Flax NNX port of transformers' T5ForConditionalGeneration.

MGIE's expressive instructions are LLaVA answers summarised by a Flan-T5-XXL fine-tune
(data_pipelines.expressive). T5 differs from LLaMA in ways that matter for parity: RMSNorm without
mean or bias, no 1/sqrt(d) attention scaling, a learned relative-position bias computed by the first
layer and shared by the others (bidirectional in the encoder, causal in the decoder), a gated-GELU
feed-forward, an untied head (v1.1), and decoding that starts from `decoder_start_token_id` (0).
Layers are stacked and scanned; decoding uses a functional self-attention cache and cross-attention
keys/values computed once from the encoder output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.core.parallel import constrain
from mgie_jax.models import layers
from mgie_jax.models.attention import dot_product_attention, empty_kv_cache


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: int | None = None
  num_heads: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  tie_word_embeddings: bool = False    # the head is the embedding (T5 v1.0) or its own matrix
  scale_decoder_outputs: bool = False  # hidden * d_model^-0.5 before the head (T5 v1.0 only)
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  # Runtime choices, not part of the checkpoint.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as T5 v1.1 was trained.
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "T5Config":
    hf = dict(hf)
    if isinstance(hf.get("eos_token_id"), list):
      hf["eos_token_id"] = hf["eos_token_id"][0]
    # transformers 4 wrote tie_word_embeddings=False for v1.1 / Flan-T5 and used it to mean "do not
    # rescale"; transformers 5 writes scale_decoder_outputs. Whether the head has its own matrix is
    # decided by the checkpoint (mgie_jax.convert.t5_weights), not by this flag.
    hf.setdefault("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    hf.pop("tie_word_embeddings", None)
    if hf.get("decoder_start_token_id") is None:
      hf["decoder_start_token_id"] = hf.get("pad_token_id", 0)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime and v is not None}, **runtime)


class Seq2SeqOutput(NamedTuple):
  logits: jax.Array                 # [B, T, vocab]
  cache: dict | None = None


ACT = ("batch", "length", "act_embed")


def relative_position_buckets(relative: np.ndarray, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position (key - query), computed in float32 on the host as
  transformers does; exact small offsets, log-spaced ones up to max_distance, then saturated."""
  relative = np.asarray(relative, np.int64)
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0) * num_buckets
    distance = np.abs(relative)
  else:
    distance = -np.minimum(relative, 0)
  exact = num_buckets // 2
  with np.errstate(divide="ignore", invalid="ignore"):
    scaled = (np.log(distance.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
              * np.float32(num_buckets - exact))
  large = np.minimum(exact + np.where(distance < exact, 0, scaled).astype(np.int64), num_buckets - 1)
  return buckets + np.where(distance < exact, distance, large)


class RelativeBias(nnx.Module):
  """The learned [buckets, heads] table of the first layer; returns additive bias [1, heads, q, k]."""

  def __init__(self, cfg: T5Config, bidirectional: bool, rngs: nnx.Rngs):
    self.embedding = layers.param(
        nnx.initializers.normal(1.0)(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads),
                                     cfg.param_dtype), (None, "heads"))
    self.bidirectional = bidirectional
    self.cfg = cfg

  def __call__(self, query_positions, key_positions):
    md = self.cfg.relative_attention_max_distance
    # Buckets saturate beyond max_distance: a table over [-md, md] covers every offset exactly.
    table = jnp.asarray(relative_position_buckets(
        np.arange(-md, md + 1), bidirectional=self.bidirectional,
        num_buckets=self.cfg.relative_attention_num_buckets, max_distance=md), jnp.int32)
    relative = jnp.clip(key_positions[None, :] - query_positions[:, None], -md, md)
    values = self.embedding[...][table[relative + md]]            # [q, k, heads]
    return jnp.transpose(values, (2, 0, 1))[None]


class T5Attention(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=False)
    self.q = layers.linear(d, inner, ("embed", "heads"), **kw)
    self.k = layers.linear(d, inner, ("embed", "heads"), **kw)
    self.v = layers.linear(d, inner, ("embed", "heads"), **kw)
    self.o = layers.linear(inner, d, ("heads", "embed"), **kw)
    self.cfg = cfg

  def heads(self, x):
    return x.reshape(*x.shape[:2], self.cfg.num_heads, self.cfg.d_kv)

  def key_values(self, x):
    return self.heads(self.k(x)), self.heads(self.v(x))

  def __call__(self, x, bias, mask, *, kv=None, kv_cache=None, cache_index=None):
    """`kv`: precomputed (k, v) (cross-attention); `kv_cache`: self-attention cache written at
    `cache_index`. Scores get no 1/sqrt(d) scaling: T5 folds it into the initialisation."""
    q = self.heads(self.q(x))
    if kv is None:
      k, v = self.key_values(x)
      if kv_cache is not None:
        start = (0, cache_index, 0, 0)
        k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
        v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
        kv_cache = (k, v)
    else:
      k, v = kv
    b, t = x.shape[:2]
    bias = jnp.broadcast_to(bias, (b, self.cfg.num_heads, t, k.shape[1])).astype(q.dtype)
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, bias=bias, scale=1.0)
    return self.o(out.reshape(b, t, -1)), kv_cache


class T5FeedForward(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=False)
    if cfg.gated:
      self.wi_0 = layers.linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
      self.wi_1 = layers.linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
    else:
      self.wi = layers.linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
    self.wo = layers.linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.act)
    self.gated = cfg.gated

  def __call__(self, x):
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


def _norm(cfg: T5Config):
  # T5's layer norm is LLaMA's RMSNorm: no mean subtraction, no bias, fp32 statistics.
  return layers.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, param_dtype=cfg.param_dtype)


class T5EncoderLayer(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.self_norm = _norm(cfg)
    self.self_attn = T5Attention(cfg, rngs)
    self.ff_norm = _norm(cfg)
    self.ff = T5FeedForward(cfg, rngs)

  def __call__(self, x, bias, mask):
    x = x + self.self_attn(self.self_norm(x), bias, mask)[0]
    return x + self.ff(self.ff_norm(x))


class T5DecoderLayer(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.self_norm = _norm(cfg)
    self.self_attn = T5Attention(cfg, rngs)
    self.cross_norm = _norm(cfg)
    self.cross_attn = T5Attention(cfg, rngs)
    self.ff_norm = _norm(cfg)
    self.ff = T5FeedForward(cfg, rngs)

  def __call__(self, x, self_bias, self_mask, cross_kv, cross_mask, kv_cache=None, cache_index=None):
    attn, kv_cache = self.self_attn(self.self_norm(x), self_bias, self_mask, kv_cache=kv_cache,
                                    cache_index=cache_index)
    x = x + attn
    x = x + self.cross_attn(self.cross_norm(x), 0.0, cross_mask, kv=cross_kv)[0]
    return x + self.ff(self.ff_norm(x)), kv_cache


class T5Encoder(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.relative_bias = RelativeBias(cfg, True, rngs)
    self.layers = layers.stacked(lambda r: T5EncoderLayer(cfg, r), cfg.num_layers, rngs)
    self.final_norm = _norm(cfg)
    self.cfg = cfg

  def __call__(self, x, attention_mask):
    t = x.shape[1]
    pos = jnp.arange(t)
    bias = self.relative_bias(pos, pos)
    mask = attention_mask.astype(bool)[:, None, None, :]

    def body(layer, x, _):
      return constrain(layer(x, bias, mask), ACT), None

    x, _ = layers.scan_layers(self.layers, body, constrain(x, ACT), remat=self.cfg.remat)
    return self.final_norm(x)


class T5Decoder(nnx.Module):

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.relative_bias = RelativeBias(cfg, False, rngs)
    self.layers = layers.stacked(lambda r: T5DecoderLayer(cfg, r), cfg.num_decoder_layers, rngs)
    self.final_norm = _norm(cfg)
    self.cfg = cfg

  def cross_key_values(self, encoded):
    """Per layer (k, v) of the encoder output: [layers, B, S, heads, d_kv] each, computed once."""
    def body(layer, carry, _):
      return carry, layer.cross_attn.key_values(encoded)
    return layers.scan_layers(self.layers, body, 0)[1]

  def __call__(self, x, cross_kv, encoder_mask, decoder_mask=None, cache=None):
    b, t = x.shape[:2]
    index = cache["index"] if cache is not None else 0
    query = index + jnp.arange(t)
    if cache is None:
      valid = jnp.ones((b, t), bool) if decoder_mask is None else decoder_mask.astype(bool)
      xs = (cross_kv, None)
    else:
      step_valid = jnp.ones((b, t), bool) if decoder_mask is None else decoder_mask.astype(bool)
      valid = jax.lax.dynamic_update_slice(cache["valid"], step_valid, (0, index))
      xs = (cross_kv, (cache["k"], cache["v"]))
    keys = jnp.arange(valid.shape[1])
    bias = self.relative_bias(query, keys)
    self_mask = ((keys[None, :] <= query[:, None])[None] & valid[:, None, :])[:, None]
    cross_mask = encoder_mask.astype(bool)[:, None, None, :]

    def body(layer, x, inputs):
      ckv, kv = inputs
      x, kv = layer(x, bias, self_mask, ckv, cross_mask, kv, index if cache is not None else None)
      return constrain(x, ACT), kv

    x, new_kv = layers.scan_layers(self.layers, body, constrain(x, ACT), xs, remat=self.cfg.remat)
    new_cache = None
    if cache is not None:
      new_cache = {"k": new_kv[0], "v": new_kv[1], "valid": valid, "index": index + t}
    return self.final_norm(x), new_cache


class T5ForConditionalGeneration(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.config = cfg
    self.shared = layers.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs, std=1.0)
    self.encoder = T5Encoder(cfg, rngs)
    self.decoder = T5Decoder(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def encode(self, input_ids, attention_mask):
    return self.encoder(self.shared(input_ids), attention_mask)

  def logits(self, hidden):
    if self.config.scale_decoder_outputs:
      hidden = hidden * self.config.d_model ** -0.5
    if self.config.tie_word_embeddings:
      return self.shared.attend(hidden)
    return self.lm_head(hidden)

  def decode(self, decoder_input_ids, cross_kv, encoder_mask, decoder_mask=None, cache=None) -> Seq2SeqOutput:
    hidden, cache = self.decoder(self.shared(decoder_input_ids), cross_kv, encoder_mask, decoder_mask, cache)
    return Seq2SeqOutput(constrain(self.logits(hidden), ("batch", "length", "vocab")), cache)

  def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> Seq2SeqOutput:
    encoded = self.encode(input_ids, attention_mask)
    return self.decode(decoder_input_ids, self.decoder.cross_key_values(encoded), attention_mask,
                       decoder_attention_mask)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
    """Empty decoder self-attention cache: k/v [layers, B, max_length, heads, d_kv]."""
    cfg = self.config
    return empty_kv_cache(cfg.num_decoder_layers, batch, max_length, cfg.num_heads, cfg.d_kv, dtype or cfg.dtype)
