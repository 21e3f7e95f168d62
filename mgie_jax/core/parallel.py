"""Device mesh and logical-axis sharding rules.

Model code names logical axes only; one rules table maps them to the mesh axes
('data', 'fsdp', 'tensor'). Parameters are placed with `shard_module`, activations
pinned at block boundaries with `constrain` while a mesh is active.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),       # activations' feature axis: replicated, batch carries fsdp
    ("layers", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),            # norm scales and biases: small, replicated
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """jax.distributed from explicit flags (CPU processes talk over gloo), or from the environment
  of a TPU pod / SLURM job / JAX_COORDINATOR_ADDRESS; a single process needs nothing."""
  if coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_ID")):
    jax.distributed.initialize()


def cpu_threads_advice(platform: str, local_devices: int, cores: int, env) -> str | None:
  """A warning for simulated CPU meshes short of threads, or None. The devices share one thread
  pool and a collective holds its thread while it waits: with about one thread per device a
  sharded step can deadlock, and XLA aborts the process after 40 s (PJRT_NPROC sizes the pool)."""
  if platform != "cpu" or local_devices < 2 or "PJRT_NPROC" in env or cores >= 4 * local_devices:
    return None
  return (f"{local_devices} CPU devices on {cores} cores: if a step stops in a collective, set "
          f"PJRT_NPROC={4 * local_devices} (threads for the devices' shared pool)")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 and takes what is left."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into data x fsdp x tensor = {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} are present")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names, rules=DEFAULT_RULES) -> P:
  return nn.logical_to_mesh_axes(tuple(names), rules)


def _fit(spec: P, shape, mesh: Mesh, where: str) -> P:
  """Make a spec valid for `shape`: a dimension that mesh axes do not divide (e.g. an odd
  vocabulary) is replicated with a warning; a mesh axis already used by an earlier
  dimension is dropped from later ones."""
  out, used = [], set()
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a not in used)
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      log.warning("%s: dimension %d is not divisible by mesh axes %s (%d); replicating it",
                  where, dim, names, size)
      names = ()
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx State (real or abstract) from the logical names on its variables."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  flat_specs = dict(nnx.to_flat_state(specs))
  out = []
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    spec = _fit(flat_specs[path].get_value(), shape, mesh, ".".join(map(str, path)))
    out.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(out)


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Place every variable of `module` on `mesh` per the rules (in place; returns the module)."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module


# --- activation constraints -------------------------------------------------------------------

_ctx = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
  """While active (when tracing), `constrain` pins activations to the mesh."""
  prev = getattr(_ctx, "value", None)
  _ctx.value = (mesh, rules)
  try:
    yield mesh
  finally:
    _ctx.value = prev


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op when no mesh is active."""
  ctx = getattr(_ctx, "value", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = _fit(logical_to_spec(names, rules), x.shape, mesh, f"activation {names}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def place(read, shape, dtype, sharding: NamedSharding):
  """A global array on `sharding` whose values come from `read()` (a host numpy array, read once
  and released once this host's devices hold their shards): nothing else is replicated, no
  device ever holds more than its shard."""
  cache = {}

  def shard(index):
    if "value" not in cache:
      cache["value"] = np.asarray(read())
      if tuple(cache["value"].shape) != tuple(shape):
        raise ValueError(f"loaded shape {cache['value'].shape} != expected {tuple(shape)}")
    return np.asarray(cache["value"][index], dtype=dtype)

  out = jax.make_array_from_callback(tuple(shape), sharding, shard)
  cache.clear()
  return out


def place_tree(loaders: dict, template: dict, shardings: dict, dtype, prefix: str = "") -> dict:
  """`template` (a nested dict of abstract arrays, paths relative to `prefix`) filled from
  `loaders` (dotted path -> object with `.full()`), each leaf straight onto its sharding."""
  out = {}
  for k, v in template.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out[k] = place_tree(loaders, v, shardings[k], dtype, name + ".")
    else:
      dt = dtype if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype
      out[k] = place(loaders[name].full, v.shape, dt, shardings[k])
  return out
