"""Stable Diffusion UNet (SD-1.x/2.x family), a Flax NNX port of diffusers' UNet2DConditionModel.

NHWC. MGIE uses SD-1.5's UNet with conv_in widened to 8 input channels (noisy latents
concatenated with the input image's latents), conditioned on the edit head's 77x768 output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.core.parallel import constrain
from mgie_jax.models import layers
from mgie_jax.models.diffusion_blocks import (Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D, conv2d,
                                              group_norm)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
ACT = ("batch", None, None, "act_embed")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple = 8      # diffusers' name; for SD-1.x it is the number of heads
  num_attention_heads: int | tuple | None = None
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  transformer_layers_per_block: int = 1
  sample_size: int = 64
  # Runtime choices, not part of the checkpoint.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
    bad += [t for t in self.up_block_types if t not in UP_BLOCKS]
    if bad:
      raise ValueError(f"unsupported UNet block types {bad}; supported: {DOWN_BLOCKS + UP_BLOCKS}")
    n = len(self.block_out_channels)
    if not len(self.down_block_types) == len(self.up_block_types) == n:
      raise ValueError("down_block_types, up_block_types and block_out_channels must have equal length")
    if not isinstance(self.transformer_layers_per_block, int):
      raise ValueError("per-block transformer_layers_per_block is not supported")

  @property
  def heads(self) -> tuple:
    h = self.num_attention_heads or self.attention_head_dim
    return tuple(h) if isinstance(h, (list, tuple)) else (h,) * len(self.block_out_channels)

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "UNetConfig":
    unsupported = {k: hf[k] for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim",
                                      "time_cond_proj_dim", "num_class_embeds")
                   if hf.get(k) is not None}
    unsupported.update({k: hf[k] for k in ("only_cross_attention", "upcast_attention",
                                           "dual_cross_attention") if hf.get(k)})
    if hf.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
      unsupported["mid_block_type"] = hf["mid_block_type"]
    if hf.get("center_input_sample"):
      unsupported["center_input_sample"] = True
    if unsupported:
      raise ValueError(f"UNet options not supported by mgie_jax: {unsupported}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, shift: float, max_period: float = 10000.0):
  """diffusers get_timestep_embedding: sinusoidal features of (possibly fractional) timesteps."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):

  def __init__(self, cin: int, dim: int, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=None)
    self.linear_1 = layers.linear(cin, dim, ("embed", "mlp"), **kw)
    self.linear_2 = layers.linear(dim, dim, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNetBlock(nnx.Module):
  """One down, mid or up block: resnets, optional attentions, optional resampler."""

  def __init__(self, cfg: UNetConfig, kind: str, resnet_io: list, channels: int, heads: int,
               attention: bool, resample: str | None, rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    temb = cfg.block_out_channels[0] * 4
    self.kind = kind
    self.resnets = nnx.List([ResnetBlock2D(i, o, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                           rngs=rngs, **kw) for i, o in resnet_io])
    n_attn = 1 if kind == "mid" else len(resnet_io)
    self.attentions = nnx.List([
        Transformer2DModel(channels, heads, cfg.cross_attention_dim, rngs, groups=cfg.norm_num_groups,
                           linear_projection=cfg.use_linear_projection,
                           num_layers=cfg.transformer_layers_per_block, impl=cfg.attention_impl, **kw)
        for _ in range(n_attn)]) if attention else None
    if resample == "down":
      self.downsamplers = nnx.List([Downsample2D(channels, rngs, **kw)])
    if resample == "up":
      self.upsamplers = nnx.List([Upsample2D(channels, rngs, **kw)])
    self.resample = resample
    self.remat = cfg.remat

  def _layer(self, n, x, temb, context):
    x = self.resnets[n](x, temb)
    if self.attentions is not None:
      x = self.attentions[n](x, context)
    return constrain(x, ACT)

  def __call__(self, x, temb, context, skips=None):
    """Down: returns (x, outputs for skips). Up: consumes `skips` (a list, popped from the end)."""
    if self.remat:   # recompute each resnet+attention pair in the backward pass
      remat = nnx.remat(UNetBlock._layer, static_argnums=(1,))
      layer = lambda n, x, t, c: remat(self, n, x, t, c)
    else:
      layer = self._layer
    if self.kind == "mid":
      x = self.resnets[0](x, temb)
      x = self.attentions[0](x, context)
      return self.resnets[1](x, temb)
    outputs = []
    for n in range(len(self.resnets)):
      if self.kind == "up":
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = layer(n, x, temb, context)
      outputs.append(x)
    if self.resample == "down":
      x = self.downsamplers[0](x)
      outputs.append(x)
    if self.resample == "up":
      x = self.upsamplers[0](x)
    return x, outputs


class UNet2DConditionModel(nnx.Module):

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    boc, heads, lpb = cfg.block_out_channels, cfg.heads, cfg.layers_per_block
    self.conv_in = conv2d(cfg.in_channels, boc[0], 3, rngs, **kw)
    self.time_embedding = TimestepEmbedding(boc[0], boc[0] * 4, rngs, **kw)

    down, out_ch = [], boc[0]
    for i, kind in enumerate(cfg.down_block_types):
      in_ch, out_ch = out_ch, boc[i]
      io = [(in_ch if j == 0 else out_ch, out_ch) for j in range(lpb)]
      down.append(UNetBlock(cfg, "down", io, out_ch, heads[i], kind.startswith("CrossAttn"),
                            "down" if i < len(boc) - 1 else None, rngs))
    self.down_blocks = nnx.List(down)
    self.mid_block = UNetBlock(cfg, "mid", [(boc[-1], boc[-1])] * 2, boc[-1], heads[-1], True, None, rngs)

    up, rboc, rheads = [], boc[::-1], heads[::-1]
    out_ch = rboc[0]
    for i, kind in enumerate(cfg.up_block_types):
      prev, out_ch = out_ch, rboc[i]
      in_ch = rboc[min(i + 1, len(boc) - 1)]
      io = [((prev if j == 0 else out_ch) + (in_ch if j == lpb else out_ch), out_ch) for j in range(lpb + 1)]
      up.append(UNetBlock(cfg, "up", io, out_ch, rheads[i], kind.startswith("CrossAttn"),
                          "up" if i < len(boc) - 1 else None, rngs))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = group_norm(boc[0], cfg.norm_num_groups, cfg.norm_eps, rngs, **kw)
    self.conv_out = conv2d(boc[0], cfg.out_channels, 3, rngs, **kw)

  def __call__(self, sample, timesteps, encoder_hidden_states):
    """sample [B, H, W, in_channels], timesteps [B] or scalar, encoder_hidden_states [B, S, cross_dim]."""
    cfg = self.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects NHWC samples with {cfg.in_channels} channels, got {sample.shape}")
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise ValueError(f"UNet sample height/width must be multiples of {factor}, got {sample.shape[1:3]}")
    b = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    temb = self.time_embedding(
        timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(cfg.dtype))
    context = encoder_hidden_states.astype(cfg.dtype)
    x = constrain(self.conv_in(sample.astype(cfg.dtype)), ACT)
    skips = [x]
    for block in self.down_blocks:
      x, outs = block(x, temb, context)
      skips += outs
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      x, _ = block(x, temb, context, skips)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
