"""LLaMA decoder (Vicuna-7B in MGIE), a Flax NNX port of transformers' LlamaForCausalLM.

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, layers stacked
and scanned, and a functional KV cache for decoding.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.core.parallel import constrain
from mgie_jax.models import layers
from mgie_jax.models.attention import causal_padding_mask, dot_product_attention, empty_kv_cache


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  initializer_range: float = 0.02   # std of every weight at random init (HF's field)
  # Runtime choices, not part of the checkpoint.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})")

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "LlamaConfig":
    hf = dict(hf.get("text_config", hf))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
      raise ValueError(f"rope scaling {rope} is not supported by mgie_jax's LLaMA port")
    if "rope_theta" in rope:
      hf["rope_theta"] = rope["rope_theta"]
    if isinstance(hf.get("eos_token_id"), list):
      hf["eos_token_id"] = hf["eos_token_id"][0]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


ACT = ("batch", "length", "act_embed")


class LlamaOutput(NamedTuple):
  logits: jax.Array          # [B, T, vocab]
  hidden_states: jax.Array   # [B, T, D] last layer, after the final RMSNorm
  cache: dict | None = None


def rotary(x, positions, theta: float):
  """HF's rotate-half RoPE on x [B, T, heads, head_dim] at integer positions [B, T]."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]    # [B, T, 1, dim]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = dim // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class LlamaAttention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.head_dim
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=cfg.attention_bias,
              std=cfg.initializer_range)
    self.q_proj = layers.linear(d, n * h, ("embed", "heads"), **kw)
    self.k_proj = layers.linear(d, k * h, ("embed", "kv_heads"), **kw)
    self.v_proj = layers.linear(d, k * h, ("embed", "kv_heads"), **kw)
    self.o_proj = layers.linear(n * h, d, ("heads", "embed"), **kw)
    self.cfg = cfg

  def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
    if kv_cache is not None:
      ck, cv = kv_cache
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
      kv_cache = (k, v)
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                implementation=cfg.attention_impl)
    return self.o_proj(out.reshape(b, t, -1)), kv_cache


class LlamaMLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs, use_bias=cfg.mlp_bias,
              std=cfg.initializer_range)
    self.gate_proj = layers.linear(d, f, ("embed", "mlp"), **kw)
    self.up_proj = layers.linear(d, f, ("embed", "mlp"), **kw)
    self.down_proj = layers.linear(f, d, ("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.self_attn = LlamaAttention(cfg, rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = LlamaMLP(cfg, rngs)

  def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
    attn, kv_cache = self.self_attn(self.input_layernorm(x), positions, mask, kv_cache, cache_index)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


class LlamaModel(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"),
                                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                     std=cfg.initializer_range)
    self.layers = layers.stacked(lambda r: LlamaDecoderLayer(cfg, r), cfg.num_hidden_layers, rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

  def __call__(self, inputs_embeds, attention_mask=None, positions=None, cache=None):
    """Returns (final-normed hidden states, updated cache or None)."""
    b, t, _ = inputs_embeds.shape
    index = cache["index"] if cache is not None else 0
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
    query_slots = index + jnp.arange(t)
    if cache is None:
      key_valid, xs = attention_mask, None
    else:
      key_valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, index))
      xs = (cache["k"], cache["v"])
    mask = causal_padding_mask(query_slots, key_valid)

    def body(layer, x, kv):
      x, kv = layer(x, positions, mask, kv, index if cache is not None else None)
      return constrain(x, ACT), kv

    x = constrain(inputs_embeds.astype(self.config.dtype), ACT)
    x, new_kv = layers.scan_layers(self.layers, body, x, xs,
                                   remat=self.config.remat)
    new_cache = None
    if cache is not None:
      new_cache = {"k": new_kv[0], "v": new_kv[1], "valid": key_valid, "index": index + t}
    return self.norm(x), new_cache


class LlamaForCausalLM(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.model = LlamaModel(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                                   std=cfg.initializer_range)

  def embed(self, input_ids):
    with jax.named_scope("embed_tokens"):   # scopes name each part's ops in profiles and HLO
      return self.model.embed_tokens(input_ids)

  def logits(self, hidden):
    with jax.named_scope("lm_head"):
      if self.config.tie_word_embeddings:
        return self.model.embed_tokens.attend(hidden)
      return self.lm_head(hidden)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
               cache=None) -> LlamaOutput:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    with jax.named_scope("decoder"):
      hidden, cache = self.model(inputs_embeds, attention_mask, positions, cache)
    logits = constrain(self.logits(hidden), ("batch", "length", "vocab"))
    return LlamaOutput(logits, hidden, cache)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache: k/v [layers, B, max_length, kv_heads, head_dim], per-slot validity, write index."""
    cfg = self.config
    return empty_kv_cache(cfg.num_hidden_layers, batch, max_length, cfg.num_key_value_heads, cfg.head_dim,
                          dtype or cfg.dtype)
