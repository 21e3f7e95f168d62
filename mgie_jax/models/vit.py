"""ViT, a Flax NNX port of transformers' ViTModel: the DINO ViT-S/16 image encoder that the
DINO similarity metric reads (CLS state after the final LayerNorm). Images NHWC, normalised
with ImageNet mean/std.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mgie_jax.core.parallel import constrain
from mgie_jax.models import layers
from mgie_jax.models.attention import dot_product_attention

ACT = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "ViTConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


class ViTLayer(nnx.Module):
  """Pre-LN block with HF ViT's names: layernorm_before, attention (query/key/value, output),
  layernorm_after, intermediate, output."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.heads, self.impl = cfg.num_attention_heads, cfg.attention_impl
    self.layernorm_before = layers.layer_norm(d, "embed", eps=cfg.layer_norm_eps, **kw)
    self.query = layers.linear(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.key = layers.linear(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.value = layers.linear(d, d, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.attention_output = layers.linear(d, d, ("heads", "embed"), **kw)
    self.layernorm_after = layers.layer_norm(d, "embed", eps=cfg.layer_norm_eps, **kw)
    self.intermediate = layers.linear(d, f, ("embed", "mlp"), **kw)
    self.output = layers.linear(f, d, ("mlp", "embed"), **kw)
    self.act = layers.activation(cfg.hidden_act)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.layernorm_before(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    a = dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)),
                              implementation=self.impl)
    x = x + self.attention_output(a.reshape(b, t, d))
    return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class ViTModel(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d = cfg.hidden_size
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    n = (cfg.image_size // cfg.patch_size) ** 2
    self.cls_token = layers.param(jnp.zeros((1, 1, d), cfg.param_dtype), (None, None, "embed"))
    self.position_embeddings = layers.param(jnp.zeros((1, n + 1, d), cfg.param_dtype), (None, None, "embed"))
    self.patch_embedding = layers.conv(cfg.num_channels, d, cfg.patch_size, ("conv_in", "embed"),
                                       stride=cfg.patch_size, padding="VALID", **kw)
    self.layers = layers.stacked(lambda r: ViTLayer(cfg, r), cfg.num_hidden_layers, rngs)
    self.layernorm = layers.layer_norm(d, "embed", eps=cfg.layer_norm_eps, **kw)

  def __call__(self, pixel_values):
    """[B, H, W, 3] -> last_hidden_state [B, 1 + patches, D] after the final LayerNorm."""
    cfg = self.config
    b, h, w, c = pixel_values.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"ViTModel expects NHWC images of {cfg.image_size}x{cfg.image_size}x{cfg.num_channels}, "
                       f"got {pixel_values.shape}")
    x = self.patch_embedding(pixel_values.astype(cfg.dtype))
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)

    def body(layer, h, _):
      return constrain(layer(h), ACT), None

    x, _ = layers.scan_layers(self.layers, body, constrain(x, ACT), remat=cfg.remat)
    return self.layernorm(x)

  def cls_features(self, pixel_values):
    return self(pixel_values)[:, 0]
