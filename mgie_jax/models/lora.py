"""LoRA (Hu et al. 2021) on chosen Linear layers, in PEFT's convention:

  y = x W + b + (alpha / r) * dropout(x) A B,    A [in, r] ~ U(+-1/sqrt(in)), B [r, out] = 0

so a model with fresh adapters computes exactly what its base computes. A wrapped layer keeps
the base's parameters under their own names (`kernel`, `bias`: the weight-import and export
tables apply unchanged) and adds `lora_a` and `lora_b`, which are `LoraParam`s: trained whatever
`config.trainable` says, while the base stays frozen in its frozen dtype unless listed there.
Inside a layer stack (LLaMA's scanned layers) the factors are stacked like the kernel and carry
its logical axes, so they shard as the layer does.

Targets are regular expressions that must match a Linear's whole dotted path in MGIE (e.g.
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), or the names of PRESETS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.models import layers

PRESETS = {
    # LLaMA's attention and MLP projections (all layers: the stack is one module)
    "llm_attention": r"mllm\.language_model\.model\.layers\.self_attn\.[qkvo]_proj",
    "llm_mlp": r"mllm\.language_model\.model\.layers\.mlp\.(gate|up|down)_proj",
    # the UNet's self- and cross-attention projections (what diffusers' LoRA trainers target)
    "unet_attention": r"unet\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0                       # 0: no adapters
  alpha: float = 16.0
  dropout: float = 0.0                # on the adapter's input, training steps only
  targets: tuple = ()                 # PRESETS names or regexes over dotted Linear paths

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def patterns(self) -> list:
    return [re.compile(PRESETS.get(t, t)) for t in self.targets]

  def __post_init__(self):
    if self.rank < 0 or (self.rank and not self.targets):
      raise ValueError(f"LoRA needs rank >= 1 and at least one target (rank {self.rank}, targets {self.targets})")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


class LoraParam(nnx.Param):
  """An adapter factor: always among the trained parameters."""


def is_adapter(path: str) -> bool:
  return path.endswith(".lora_a") or path.endswith(".lora_b")


_BASE_FIELDS = ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                "dot_general", "promote_dtype", "preferred_element_type")


class LoRALinear(nnx.Module):
  """A Linear layer with an adapter; the base part is nnx.Linear's own computation."""

  def __init__(self, base: nnx.Linear, path: str, cfg: LoraConfig, key):
    for name in _BASE_FIELDS:
      setattr(self, name, getattr(base, name))
    self.kernel, self.bias = base.kernel, base.bias
    self.scaling, self.rate = cfg.scaling, cfg.dropout
    self.dropout_id = _path_id(path)
    shape_a, shape_b = factor_shapes(base.kernel.shape, cfg.rank)
    axes = tuple(base.kernel.get_metadata().get("out_sharding") or (None,) * len(base.kernel.shape))
    self.lora_a = LoraParam(initial_a(key, path, shape_a, base.param_dtype), out_sharding=axes[:-1] + (None,),
                            **layers.EAGER)
    self.lora_b = LoraParam(jnp.zeros(shape_b, base.param_dtype), out_sharding=axes[:-2] + (None, axes[-1]),
                            **layers.EAGER)

  def __call__(self, x):
    y = nnx.Linear.__call__(self, x)
    h = x
    key = getattr(_DROPOUT, "key", None)
    if self.rate and key is not None:
      key = jax.random.fold_in(key, self.dropout_id)
      index = layers.layer_index()
      if index is not None:                 # a different mask in every layer of a scanned stack
        key = jax.random.fold_in(key, index)
      keep = jax.random.bernoulli(key, 1.0 - self.rate, h.shape)
      h = jnp.where(keep, h / (1.0 - self.rate), 0).astype(h.dtype)
    a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
    return y + (h.astype(y.dtype) @ a @ b) * jnp.asarray(self.scaling, y.dtype)


def _path_id(path: str) -> int:
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def factor_shapes(kernel_shape, rank: int) -> tuple:
  """(A, B) shapes for a kernel [..., in, out] (leading dims: a layer stack)."""
  *stack, fan_in, fan_out = kernel_shape
  return tuple(stack) + (fan_in, rank), tuple(stack) + (rank, fan_out)


def initial_a(key, path: str, shape, dtype=jnp.float32):
  """A's initial value: PEFT's kaiming-uniform(a=sqrt(5)) bound, 1/sqrt(fan_in); one key per path,
  so values do not depend on the order layers are built in."""
  bound = 1.0 / np.sqrt(shape[-2])
  return jax.random.uniform(jax.random.fold_in(key, _path_id(path)), shape, jnp.float32, -bound, bound).astype(dtype)


def _targets(model, cfg: LoraConfig) -> list:
  pats = cfg.patterns()
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      name = ".".join(map(str, path))
      if any(p.fullmatch(name) for p in pats):
        out.append((path, name, node))
  return out


def add_adapters(model, cfg: LoraConfig, key) -> list[str]:
  """Wrap every Linear of `model` that a target matches (in place); returns the wrapped paths.
  A target matching nothing is a mistake (a typo would silently train nothing)."""
  found = _targets(model, cfg)
  for t in cfg.targets:
    p = re.compile(PRESETS.get(t, t))
    if not any(p.fullmatch(name) for _, name, _ in found):
      raise ValueError(f"LoRA target {t!r} matches no Linear layer of the model")
  for path, name, node in found:
    parent = model
    for part in path[:-1]:
      parent = parent[int(part)] if isinstance(part, int) or str(part).isdigit() else getattr(parent, part)
    wrapped = LoRALinear(node, name, cfg, key)
    last = path[-1]
    if isinstance(last, int) or str(last).isdigit():
      parent[int(last)] = wrapped
    else:
      setattr(parent, last, wrapped)
  return [name for _, name, _ in found]


def adapted_layers(model) -> dict:
  """dotted path -> LoRALinear, for every adapted layer of `model`."""
  return {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, LoRALinear)}


def merged_kernel(kernel, a, b, scaling: float):
  """W + (alpha / r) A B for numpy arrays (a stacked kernel included), in float32."""
  delta = np.einsum("...ir,...ro->...io", np.asarray(a, np.float32), np.asarray(b, np.float32))
  return (np.asarray(kernel, np.float32) + np.float32(scaling) * delta).astype(np.asarray(kernel).dtype)


def trainable_count(model) -> int:
  """Adapter parameters of `model` (what LoRA trains beyond config.trainable)."""
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, LoraParam)))


_DROPOUT = threading.local()


@contextlib.contextmanager
def dropout(key):
  """Adapter dropout on for the forward passes traced inside (a training step's key); off outside."""
  old = getattr(_DROPOUT, "key", None)
  _DROPOUT.key = key
  try:
    yield
  finally:
    _DROPOUT.key = old
