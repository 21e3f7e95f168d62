"""Stable Diffusion VAE, a Flax NNX port of diffusers' AutoencoderKL (NHWC).

MGIE keeps it frozen: target latents are a posterior *sample* x scaling_factor of the edited
image, input latents the posterior *mean* (training) or *mode* (inference), unscaled.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models.diffusion_blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  sample_size: int = 512
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
    bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if bad:
      raise ValueError(f"unsupported VAE block types {bad}")

  @classmethod
  def from_hf(cls, hf: dict, **runtime) -> "VAEConfig":
    if hf.get("shift_factor") not in (None, 0, 0.0):
      raise ValueError(f"VAE shift_factor {hf['shift_factor']} is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf.items() if k in names and k not in runtime}, **runtime)


class DiagonalGaussian(NamedTuple):
  """The VAE posterior; NHWC mean/logvar [B, h, w, latent_channels]."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def mode(self):
    return self.mean

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class MidBlock(nnx.Module):

  def __init__(self, ch: int, groups: int, attention: bool, rngs, **kw):
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, None, groups=groups, eps=1e-6, rngs=rngs, **kw)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(ch, 1, rngs, qkv_bias=True, norm_groups=groups,
                                          norm_eps=1e-6, **kw)]) if attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class CoderBlock(nnx.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: resnets without time embedding, then a resampler."""

  def __init__(self, io, groups: int, resample: str | None, rngs, **kw):
    self.resnets = nnx.List([ResnetBlock2D(i, o, None, groups=groups, eps=1e-6, rngs=rngs, **kw)
                             for i, o in io])
    ch = io[-1][1]
    if resample == "down":
      self.downsamplers = nnx.List([Downsample2D(ch, rngs, asymmetric=True, **kw)])
    if resample == "up":
      self.upsamplers = nnx.List([Upsample2D(ch, rngs, **kw)])
    self.resample = resample

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    if self.resample == "down":
      x = self.downsamplers[0](x)
    elif self.resample == "up":
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs, **kw):
    boc, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
    self.conv_in = conv2d(cfg.in_channels, boc[0], 3, rngs, **kw)
    blocks, out = [], boc[0]
    for i in range(len(boc)):
      cin, out = out, boc[i]
      blocks.append(CoderBlock([(cin if j == 0 else out, out) for j in range(n)], g,
                               "down" if i < len(boc) - 1 else None, rngs, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, rngs, **kw)
    self.conv_norm_out = group_norm(boc[-1], g, 1e-6, rngs, **kw)
    self.conv_out = conv2d(boc[-1], 2 * cfg.latent_channels, 3, rngs, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, rngs, **kw):
    rboc, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block
    self.conv_in = conv2d(cfg.latent_channels, rboc[0], 3, rngs, **kw)
    self.mid_block = MidBlock(rboc[0], g, cfg.mid_block_add_attention, rngs, **kw)
    blocks, out = [], rboc[0]
    for i in range(len(rboc)):
      cin, out = out, rboc[i]
      blocks.append(CoderBlock([(cin if j == 0 else out, out) for j in range(n + 1)], g,
                               "up" if i < len(rboc) - 1 else None, rngs, **kw))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = group_norm(rboc[-1], g, 1e-6, rngs, **kw)
    self.conv_out = conv2d(rboc[-1], cfg.out_channels, 3, rngs, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for b in self.up_blocks:
      x = b(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.encoder = Encoder(cfg, rngs, **kw)
    self.decoder = Decoder(cfg, rngs, **kw)
    lc = cfg.latent_channels
    self.quant_conv = conv2d(2 * lc, 2 * lc, 1, rngs, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = conv2d(lc, lc, 1, rngs, **kw) if cfg.use_post_quant_conv else None

  def encode(self, images) -> DiagonalGaussian:
    """images NHWC in [-1, 1] -> posterior over unscaled latents."""
    factor = 2 ** (len(self.config.block_out_channels) - 1)
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"VAE expects NHWC images with {self.config.in_channels} channels, got {images.shape}")
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"VAE image height/width must be multiples of {factor}, got {images.shape[1:3]}")
    moments = self.encoder(images.astype(self.config.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    """Unscaled latents NHWC -> images NHWC (about [-1, 1])."""
    z = latents.astype(self.config.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)
