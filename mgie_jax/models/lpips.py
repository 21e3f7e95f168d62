"""LPIPS (Zhang et al. 2018, v0.1), a Flax NNX port of the `lpips` package's metric network:
torchvision's AlexNet or VGG16 feature stack, features at five ReLUs, unit-normalised over
channels, squared differences weighted per channel by the learned linear heads, averaged over
space and summed over layers. Inputs NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models import layers

# torchvision `features` indices: ("conv", index, in, out, kernel, stride, padding), ("relu",),
# ("pool",), ("tap",) = an LPIPS feature is read here (after a ReLU).
ALEX = (("conv", 0, 3, 64, 11, 4, 2), ("relu",), ("tap",), ("pool", 3, 2),
        ("conv", 3, 64, 192, 5, 1, 2), ("relu",), ("tap",), ("pool", 3, 2),
        ("conv", 6, 192, 384, 3, 1, 1), ("relu",), ("tap",),
        ("conv", 8, 384, 256, 3, 1, 1), ("relu",), ("tap",),
        ("conv", 10, 256, 256, 3, 1, 1), ("relu",), ("tap",))


def _vgg16():
  spec, index, cin = [], 0, 3
  for block, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    if block:
      spec.append(("pool", 2, 2))
      index += 1
    for _ in range(convs):
      spec += [("conv", index, cin, width, 3, 1, 1), ("relu",)]
      index, cin = index + 2, width
    spec.append(("tap",))
  return tuple(spec)


VGG16 = _vgg16()
NETS = {"alex": ALEX, "vgg": VGG16}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
  net: str = "alex"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.net not in NETS:
      raise ValueError(f"LPIPS backbone must be one of {sorted(NETS)}, got {self.net!r}")

  @property
  def channels(self) -> tuple:
    spec, out, last = NETS[self.net], [], None
    for op in spec:
      if op[0] == "conv":
        last = op[3]
      if op[0] == "tap":
        out.append(last)
    return tuple(out)


class LPIPS(nnx.Module):

  def __init__(self, cfg: LPIPSConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.features = nnx.Dict({
        f"conv{op[1]}": layers.conv(op[2], op[3], op[4], ("conv_in", "conv_out"), stride=op[5],
                                padding=((op[6], op[6]), (op[6], op[6])), **kw)
        for op in NETS[cfg.net] if op[0] == "conv"})
    self.lins = nnx.List([layers.param(jnp.ones((c,), cfg.param_dtype), ("norm",))
                          for c in cfg.channels])

  def taps(self, x):
    """The five feature maps of `x` (already shifted and scaled)."""
    out = []
    for op in NETS[self.config.net]:
      if op[0] == "conv":
        x = self.features[f"conv{op[1]}"](x)
      elif op[0] == "relu":
        x = jax.nn.relu(x)
      elif op[0] == "pool":
        k, s = op[1], op[2]
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), "VALID")
      else:
        out.append(x)
    return out

  def __call__(self, a, b):
    """a, b [B, H, W, 3] in [-1, 1] -> [B] distances."""
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    prep = lambda x: ((x.astype(jnp.float32) - shift) / scale).astype(self.config.dtype)
    total = 0.0
    for fa, fb, w in zip(self.taps(prep(a)), self.taps(prep(b)), self.lins):
      unit = lambda f: f / (jnp.sqrt(jnp.sum(f.astype(jnp.float32) ** 2, -1, keepdims=True)) + 1e-10)
      diff = (unit(fa) - unit(fb)) ** 2
      total = total + jnp.mean(jnp.sum(diff * w[...].astype(jnp.float32), -1), axis=(1, 2))
    return total
