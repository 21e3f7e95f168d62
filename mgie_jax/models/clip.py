"""CLIP, a Flax NNX port of transformers' CLIPVisionModel (ViT-L/14 in MGIE), CLIPTextModel and
CLIPModel (both towers + projection heads: CLIP-I and CLIP-T in evaluation).

Images are NHWC, already normalised with the CLIP mean/std.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.core.parallel import constrain
from mgie_jax.models import layers
from mgie_jax.models.attention import dot_product_attention

ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # Runtime choices, not part of the checkpoint.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "ClipVisionConfig":
    if hf.get("model_type") == "clip" or "vision_config" in hf:
      hf = hf["vision_config"]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


class ClipVisionOutput(NamedTuple):
  last_hidden_state: jax.Array            # [B, 1 + patches, D]
  pooler_output: jax.Array                # [B, D], post-layernormed CLS
  hidden_states: tuple | None = None      # embeddings + each layer's output (HF semantics)


class ClipAttention(nnx.Module):

  def __init__(self, cfg: ClipVisionConfig, rngs: nnx.Rngs):
    d, dt, pdt = cfg.hidden_size, cfg.dtype, cfg.param_dtype
    self.num_heads, self.impl = cfg.num_attention_heads, cfg.attention_impl
    self.q_proj = layers.linear(d, d, ("embed", "heads"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.k_proj = layers.linear(d, d, ("embed", "heads"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.v_proj = layers.linear(d, d, ("embed", "heads"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.out_proj = layers.linear(d, d, ("heads", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, mask=None):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)), mask=mask, implementation=self.impl)
    return self.out_proj(out.reshape(b, t, d))


class ClipEncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg: ClipVisionConfig, rngs: nnx.Rngs):
    d, dt, pdt, eps = cfg.hidden_size, cfg.dtype, cfg.param_dtype, cfg.layer_norm_eps
    self.layer_norm1 = layers.layer_norm(d, "embed", eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.self_attn = ClipAttention(cfg, rngs)
    self.layer_norm2 = layers.layer_norm(d, "embed", eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.fc1 = layers.linear(d, cfg.intermediate_size, ("embed", "mlp"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.fc2 = layers.linear(cfg.intermediate_size, d, ("mlp", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class ClipVisionModel(nnx.Module):

  def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, dt, pdt = cfg.hidden_size, cfg.dtype, cfg.param_dtype
    self.class_embedding = layers.param(jax.random.normal(rngs.params(), (d,), pdt), ("embed",))
    self.patch_embedding = layers.conv(
        cfg.num_channels, d, cfg.patch_size, ("conv_in", "embed"), stride=cfg.patch_size,
        padding="VALID", use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.position_embedding = layers.embed(
        cfg.num_patches + 1, d, (None, "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
    eps = cfg.layer_norm_eps
    self.pre_layrnorm = layers.layer_norm(d, "embed", eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.layers = layers.stacked(lambda r: ClipEncoderLayer(cfg, r), cfg.num_hidden_layers, rngs)
    self.post_layernorm = layers.layer_norm(d, "embed", eps=eps, dtype=dt, param_dtype=pdt, rngs=rngs)

  def embeddings(self, pixel_values):
    b, h, w, c = pixel_values.shape
    cfg = self.config
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
          f"ClipVisionModel expects NHWC images of {cfg.image_size}x{cfg.image_size}x"
          f"{cfg.num_channels}, got shape {pixel_values.shape}")
    patches = self.patch_embedding(pixel_values.astype(cfg.dtype))  # [B, h', w', D]
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]

  def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> ClipVisionOutput:
    x = constrain(self.pre_layrnorm(self.embeddings(pixel_values)), ACT)

    def body(layer, h, _):
      h = constrain(layer(h), ACT)
      return h, (h if output_hidden_states else None)

    first = x
    x, per_layer = layers.scan_layers(self.layers, body, x, remat=self.config.remat)
    pooled = self.post_layernorm(x[:, 0])
    hidden = None
    if output_hidden_states:
      hidden = (first,) + tuple(per_layer[i] for i in range(per_layer.shape[0]))
    return ClipVisionOutput(x, pooled, hidden)


# --- the text tower and the two-tower model (evaluation: CLIP-I, CLIP-T) --------------------------

@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 2           # 2: pool at the highest id (the original CLIP's end token)
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "ClipTextConfig":
    if hf.get("model_type") == "clip" or "text_config" in hf:
      hf = hf["text_config"]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


class ClipTextModel(nnx.Module):
  """Causal pre-LN transformer over token + position embeddings; pooled = the end token's state."""

  def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, dt, pdt = cfg.hidden_size, cfg.dtype, cfg.param_dtype
    self.token_embedding = layers.embed(cfg.vocab_size, d, ("vocab", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.position_embedding = layers.embed(cfg.max_position_embeddings, d, (None, "embed"), dtype=dt,
                                           param_dtype=pdt, rngs=rngs)
    self.layers = layers.stacked(lambda r: ClipEncoderLayer(cfg, r), cfg.num_hidden_layers, rngs)
    self.final_layer_norm = layers.layer_norm(d, "embed", eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                                              rngs=rngs)

  def __call__(self, input_ids, attention_mask=None):
    """input_ids [B, T] -> (last_hidden_state [B, T, D], pooled [B, D])."""
    b, t = input_ids.shape
    x = self.token_embedding(input_ids) + self.position_embedding.embedding[...][:t].astype(self.config.dtype)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :])[:, None]

    def body(layer, h, _):
      return constrain(layer(h, mask), ACT), None

    x, _ = layers.scan_layers(self.layers, body, constrain(x, ACT), remat=self.config.remat)
    x = self.final_layer_norm(x)
    if self.config.eos_token_id == 2:
      end = jnp.argmax(input_ids, axis=-1)
    else:
      end = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    return x, x[jnp.arange(b), end]


class ClipModel(nnx.Module):
  """transformers' CLIPModel: both towers and their projections into the shared space."""

  def __init__(self, vision: ClipVisionConfig, text: ClipTextConfig, projection_dim: int, *, rngs: nnx.Rngs):
    self.projection_dim = projection_dim
    self.vision_model = ClipVisionModel(vision, rngs=rngs)
    self.text_model = ClipTextModel(text, rngs=rngs)
    kw = dict(use_bias=False, dtype=vision.dtype, param_dtype=vision.param_dtype, rngs=rngs)
    self.visual_projection = layers.linear(vision.hidden_size, projection_dim, ("embed", "mlp"), **kw)
    self.text_projection = layers.linear(text.hidden_size, projection_dim, ("embed", "mlp"), **kw)

  def image_features(self, pixel_values):
    """get_image_features: the projected, post-layernormed CLS state (not normalised)."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def text_features(self, input_ids, attention_mask=None):
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])
