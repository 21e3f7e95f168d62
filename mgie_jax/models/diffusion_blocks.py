"""Building blocks shared by the UNet and the VAE, mirroring diffusers' module names (NHWC).

ResnetBlock2D, Downsample2D, Upsample2D, Attention, FeedForward (GEGLU),
BasicTransformerBlock and Transformer2DModel. Convolutions use explicit PyTorch-style
padding: 'SAME' would pad a stride-2 conv on the wrong side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models import layers
from mgie_jax.models.attention import dot_product_attention


def group_norm(channels: int, groups: int, eps: float, rngs, dtype=None, param_dtype=jnp.float32):
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False, rngs=rngs,
      scale_init=layers.named(nnx.initializers.ones_init(), ("norm",)),
      bias_init=layers.named(nnx.initializers.zeros_init(), ("norm",)))


def conv2d(cin: int, cout: int, kernel: int, rngs, *, stride: int = 1, padding=None, dtype=None,
           param_dtype=jnp.float32):
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return layers.conv(cin, cout, kernel, ("conv_in", "conv_out"), stride=stride, padding=pad,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):

  def __init__(self, cin: int, cout: int, temb: int | None, *, groups: int, eps: float, rngs,
               dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = group_norm(cin, groups, eps, rngs, **kw)
    self.conv1 = conv2d(cin, cout, 3, rngs, **kw)
    if temb is not None:
      self.time_emb_proj = layers.linear(temb, cout, ("embed", "conv_out"), rngs=rngs, std=None, **kw)
    self.norm2 = group_norm(cout, groups, eps, rngs, **kw)
    self.conv2 = conv2d(cout, cout, 3, rngs, **kw)
    if cin != cout:
      self.conv_shortcut = conv2d(cin, cout, 1, rngs, **kw)
    self.has_temb, self.has_shortcut = temb is not None, cin != cout

  def __call__(self, x, temb=None):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.has_temb:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (self.conv_shortcut(x) if self.has_shortcut else x) + h


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. UNet pads 1 all round; the VAE encoder pads only right/bottom."""

  def __init__(self, channels: int, rngs, *, asymmetric: bool = False, dtype=None, param_dtype=jnp.float32):
    pad = ((0, 1), (0, 1)) if asymmetric else 1
    self.conv = conv2d(channels, channels, 3, rngs, stride=2, padding=pad, dtype=dtype,
                       param_dtype=param_dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, rngs, dtype=None, param_dtype=jnp.float32):
    self.conv = conv2d(channels, channels, 3, rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Attention(nnx.Module):
  """diffusers Attention: to_q/to_k/to_v, multi-head SDPA, to_out.0. Optional VAE-style group norm."""

  def __init__(self, dim: int, heads: int, rngs, *, context_dim: int | None = None,
               qkv_bias: bool = False, norm_groups: int | None = None, norm_eps: float = 1e-6,
               impl: str = "xla", dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=None)
    ctx = context_dim or dim
    self.heads, self.impl = heads, impl
    self.to_q = layers.linear(dim, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_k = layers.linear(ctx, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_v = layers.linear(ctx, dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.to_out = nnx.List([layers.linear(dim, dim, ("heads", "embed"), **kw)])
    self.group_norm = (group_norm(dim, norm_groups, norm_eps, rngs, dtype=dtype, param_dtype=param_dtype)
                       if norm_groups else None)

  def attend(self, x, context=None):
    """x [B, L, dim], context [B, S, ctx] -> [B, L, dim]."""
    context = x if context is None else context
    b, l, d = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, d // self.heads)
    out = dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                split(self.to_v(context)), implementation=self.impl)
    return self.to_out[0](out.reshape(b, l, d))

  def __call__(self, x):
    """VAE mid-block use: x [B, H, W, C], group norm, single-sequence attention, residual."""
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    return x + self.attend(y).reshape(b, h, w, c)


class FeedForward(nnx.Module):
  """GEGLU: proj to 2 x inner, hidden * gelu(gate), project back (diffusers ff.net.0 / ff.net.2)."""

  def __init__(self, dim: int, rngs, mult: int = 4, dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=None)
    self.proj = layers.linear(dim, dim * mult * 2, ("embed", "mlp"), **kw)
    self.out = layers.linear(dim * mult, dim, ("mlp", "embed"), **kw)

  def __call__(self, x):
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):

  def __init__(self, dim: int, heads: int, context_dim: int, rngs, *, impl="xla", dtype=None,
               param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    ln = lambda: layers.layer_norm(dim, "norm", eps=1e-5, rngs=rngs, **kw)
    self.norm1, self.norm2, self.norm3 = ln(), ln(), ln()
    self.attn1 = Attention(dim, heads, rngs, impl=impl, **kw)
    self.attn2 = Attention(dim, heads, rngs, context_dim=context_dim, impl=impl, **kw)
    self.ff = FeedForward(dim, rngs, **kw)

  def __call__(self, x, context):
    x = x + self.attn1.attend(self.norm1(x))
    x = x + self.attn2.attend(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm, proj_in (1x1 conv or Linear), transformer blocks, proj_out, residual."""

  def __init__(self, channels: int, heads: int, context_dim: int, rngs, *, groups: int,
               linear_projection: bool, num_layers: int = 1, impl="xla", dtype=None,
               param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = group_norm(channels, groups, 1e-6, rngs, **kw)
    self.linear_projection = linear_projection
    if linear_projection:
      self.proj_in = layers.linear(channels, channels, ("conv_in", "conv_out"), rngs=rngs, std=None, **kw)
      self.proj_out = layers.linear(channels, channels, ("conv_in", "conv_out"), rngs=rngs, std=None, **kw)
    else:
      self.proj_in = conv2d(channels, channels, 1, rngs, **kw)
      self.proj_out = conv2d(channels, channels, 1, rngs, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, context_dim, rngs, impl=impl, **kw)
        for _ in range(num_layers)])

  def __call__(self, x, context):
    b, h, w, c = x.shape
    y = self.norm(x)
    y = self.proj_in(y).reshape(b, h * w, c)   # a 1x1 conv and a Linear act alike on NHWC
    for block in self.transformer_blocks:
      y = block(y, context)
    return x + self.proj_out(y.reshape(b, h, w, c))
