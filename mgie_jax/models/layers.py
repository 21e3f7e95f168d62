"""Small building blocks that attach logical axis names to every parameter.

Model code names logical axes only ("embed", "mlp", "heads", ...); the rules
table in the config (mgie_jax.core.parallel) maps them to mesh axes.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple


# Parameters carry logical axis names only; mgie_jax.core.parallel places them on a mesh with explicit
# jit shardings. Eager sharding (flax's global default) would demand a mesh at construction time,
# so each parameter turns it off itself rather than through flax's process-wide config.
EAGER = dict(eager_sharding=False)


def named(init, axes: Axes):
  return nnx.with_partitioning(init, axes, **EAGER)


def param(value, axes: Axes) -> nnx.Param:
  """A parameter with logical axes `axes` (one per dimension of `value`)."""
  return nnx.Param(value, out_sharding=tuple(axes), **EAGER)


def linear(in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs,
           use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
           std: float | None = 0.02) -> nnx.Linear:
  """nnx.Linear whose kernel carries `axes` (in, out) and bias carries (out,)."""
  init = (nnx.initializers.normal(std) if std is not None
          else nnx.initializers.lecun_normal())
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, rngs=rngs,
      kernel_init=named(init, axes),
      bias_init=named(nnx.initializers.zeros_init(), (axes[-1],)))


def layer_norm(features: int, axis: str, *, eps: float, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      scale_init=named(nnx.initializers.ones_init(), (axis,)),
      bias_init=named(nnx.initializers.zeros_init(), (axis,)))


def embed(num: int, features: int, axes: Axes, *, rngs: nnx.Rngs, dtype=None,
          param_dtype=jnp.float32, std: float = 0.02) -> nnx.Embed:
  return nnx.Embed(num, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   embedding_init=named(nnx.initializers.normal(std), axes))


def conv(in_features: int, out_features: int, kernel: int, axes: Axes, *,
         rngs: nnx.Rngs, stride: int = 1, padding="SAME", use_bias: bool = True,
         dtype=None, param_dtype=jnp.float32) -> nnx.Conv:
  """NHWC convolution; kernel HWIO with logical axes (None, None, in, out)."""
  return nnx.Conv(
      in_features, out_features, (kernel, kernel), strides=(stride, stride),
      padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      rngs=rngs,
      kernel_init=named(nnx.initializers.lecun_normal(), (None, None) + tuple(axes)),
      bias_init=named(nnx.initializers.zeros_init(), (axes[-1],)))


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: normalise in fp32, cast back, then scale (HF's order of ops)."""

  def __init__(self, features: int, *, eps: float, axis: str = "embed",
               param_dtype=jnp.float32):
    self.eps = eps
    self.weight = param(jnp.ones((features,), param_dtype), (axis,))

  def __call__(self, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(dtype) * x32.astype(dtype)


def activation(name: str):
  acts = {
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "silu": jax.nn.silu,
      "relu": jax.nn.relu,
  }
  if name not in acts:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(acts)}")
  return acts[name]


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn, policy: str):
  """Wrap a scan body in jax.checkpoint according to a named policy."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


_UNROLL = threading.local()


@contextlib.contextmanager
def unrolled_layers():
  """Trace every layer stack unrolled: XLA's cost model counts a loop body once, so FLOPs and
  step-time estimates need the layers spelled out (mgie_jax.compile --unroll). Same math."""
  old = getattr(_UNROLL, "on", False)
  _UNROLL.on = True
  try:
    yield
  finally:
    _UNROLL.on = old


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, remat: str = "none"):
  """Run `body(layer, carry, x) -> (carry, y)` over layers stacked on axis 0.

  The stacked module is split into (graphdef, state) and each scan iteration
  merges one slice back into a module, so parameters stay a plain pytree that
  jit/grad/sharding see as stacked arrays.
  """
  graphdef, state = nnx.split(layers)
  n = jax.tree.leaves(state)[0].shape[0]

  def step(carry, inputs):
    layer_state, x, i = inputs
    old = getattr(_LAYER, "index", None)
    _LAYER.index = i
    try:
      return body(nnx.merge(graphdef, layer_state), carry, x)
    finally:
      _LAYER.index = old

  return jax.lax.scan(maybe_remat(step, remat), carry, (state, xs, jnp.arange(n, dtype=jnp.int32)),
                      unroll=True if getattr(_UNROLL, "on", False) else 1)


_LAYER = threading.local()


def layer_index():
  """The (traced) index of the layer being run inside `scan_layers`, or None outside a stack
  (LoRA dropout draws a different mask per layer with it)."""
  return getattr(_LAYER, "index", None)


def stacked(make_layer, num_layers: int, rngs: nnx.Rngs):
  """Create `num_layers` copies of a layer with parameters stacked on a 'layers' axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return make_layer(rngs)

  return create(rngs)
