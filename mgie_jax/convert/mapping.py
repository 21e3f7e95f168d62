"""Declarative, two-way weight mapping between PyTorch state dicts and NNX modules.

A model's table is a list of `Rule(torch_key, our_path, transform)`. Torch keys
may contain `{i}`: those tensors are stacked on axis 0 of our (scanned) parameter.
The same table drives import (`load_module`) and export (`export_state_dict`).
Import reports every missing, unexpected and mis-shaped tensor in one error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.convert.torch_files import CheckpointError, shape_of


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  ndim: int | None = None  # required rank of the torch tensor, if any


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear weight [out, in] <-> our kernel [in, out]
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T, ndim=2)
# torch conv weight OIHW <-> our HWIO kernel (images are NHWC inside JAX)
CONV = Transform("conv", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1), ndim=4)


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str
  ours: str
  transform: Transform = IDENTITY

  @property
  def stacked(self) -> bool:
    return "{i}" in self.torch

  @property
  def pattern(self) -> re.Pattern:
    return re.compile(re.escape(self.torch).replace(r"\{i\}", r"(\d+)") + "$")


def prefixed(rules: Iterable[Rule], torch_prefix: str = "", ours_prefix: str = "") -> list[Rule]:
  return [Rule(torch_prefix + r.torch, ours_prefix + r.ours, r.transform) for r in rules]


def _path(p) -> str:
  return ".".join(str(x) for x in p)


@dataclasses.dataclass
class ModulePlan:
  """A module's structure and, for each parameter, where its values come from; nothing is read
  until asked. `layer(path, i)` reads one slice of a stacked (scanned) parameter."""
  graphdef: nnx.GraphDef
  state: nnx.State                                   # abstract: shapes, dtypes, logical axes
  entries: dict                                      # our path -> (Rule, {layer or None: key}, tensors)

  def paths(self) -> list[str]:
    return list(self.entries)

  def shape(self, path: str) -> tuple:
    return tuple(dict(self._flat())[path].get_value().shape)

  def _flat(self):
    return [(_path(p), v) for p, v in nnx.to_flat_state(self.state)]

  def layer(self, path: str, i: int | None = None) -> np.ndarray:
    rule, keys, tensors = self.entries[path]
    return rule.transform.to_ours(np.asarray(tensors[keys[i]]))

  def full(self, path: str) -> np.ndarray:
    rule, keys, _ = self.entries[path]
    if not rule.stacked:
      return self.layer(path)
    return np.stack([self.layer(path, i) for i in sorted(keys)])

  def materialize(self) -> nnx.Module:
    """The module with every parameter read (in its declared dtype) on the default device."""
    flat = [(tuple(path.split(".")), var.replace(jnp.asarray(self.full(path), dtype=var.get_value().dtype)))
            for path, var in self._flat()]
    return nnx.merge(self.graphdef, nnx.from_flat_state(_fix_int_keys(flat)))


def plan_module(factory, tensors: Mapping[str, np.ndarray], rules, *, source: str,
                ignore: Iterable[str] = ()) -> ModulePlan:
  """Match a checkpoint's tensors to the parameters of the module `factory()` would make, from
  shapes alone (safetensors headers; nothing is read or allocated).

  `rules` is a table, or a function of the abstract module returning one (tables derived
  from the module's structure). `ignore` holds regexes of torch keys that are expected and
  unused (buffers such as rotary `inv_freq`). Raises CheckpointError listing all problems.
  """
  abstract = nnx.eval_shape(factory)   # shapes only: nothing is allocated or initialised
  if callable(rules):
    rules = rules(abstract)
  graphdef, state = nnx.split(abstract)
  targets = {_path(p): v for p, v in nnx.to_flat_state(state)}
  ignore = [re.compile(p) for p in ignore]
  problems: list[str] = []
  # Which torch keys each rule claims, and which it leaves over.
  claimed: dict[int, dict[int | None, str]] = {n: {} for n in range(len(rules))}
  unexpected = []
  for key in tensors:
    for n, rule in enumerate(rules):
      m = rule.pattern.match(key)
      if m:
        claimed[n][int(m.group(1)) if rule.stacked else None] = key
        break
    else:
      if not any(p.match(key) for p in ignore):
        unexpected.append(key)

  entries = {}
  for n, rule in enumerate(rules):
    if rule.ours not in targets:
      raise KeyError(f"mapping table names {rule.ours!r}, which the model does not have")
    target = targets[rule.ours].get_value()
    keys = claimed[n]
    want_layers = range(target.shape[0]) if rule.stacked else [None]
    missing = [rule.torch.replace("{i}", str(i)) for i in want_layers if i not in keys]
    extra = [keys[i] for i in keys if rule.stacked and i >= target.shape[0]]
    problems += [f"missing tensor {k} (for {rule.ours})" for k in missing]
    problems += [f"unexpected tensor {k}: the model has {target.shape[0]} layers" for k in extra]
    if missing:
      continue
    ok = True
    want_shape = target.shape[1:] if rule.stacked else target.shape
    for i in want_layers:
      key = keys[i]
      shape = shape_of(tensors, key)
      if rule.transform.ndim is not None and len(shape) != rule.transform.ndim:
        problems.append(f"{key}: shape {shape} has rank {len(shape)}, expected rank "
                        f"{rule.transform.ndim} for {rule.ours} {tuple(want_shape)}")
        ok = False
        continue
      ours = rule.transform.to_ours(np.broadcast_to(np.zeros((), np.int8), shape)).shape
      if tuple(ours) != tuple(want_shape):
        problems.append(f"{key}: shape mismatch, checkpoint gives {tuple(ours)} after "
                        f"{rule.transform.name} transform, {rule.ours} needs {tuple(want_shape)}")
        ok = False
    if ok:
      entries[rule.ours] = (rule, {i: keys[i] for i in want_layers}, tensors)

  uncovered = sorted(set(targets) - {r.ours for r in rules})
  problems += [f"model parameter {p} has no rule in the mapping table" for p in uncovered]
  problems += [f"unexpected tensor {k} (no rule maps it)" for k in sorted(unexpected)]
  if problems:
    raise CheckpointError(source, problems)
  return ModulePlan(graphdef, state, entries)


def load_module(factory: Callable[[], nnx.Module], tensors: Mapping[str, np.ndarray],
                rules, *, source: str, ignore: Iterable[str] = ()) -> nnx.Module:
  """Build the module `factory()` would make, with every parameter taken from `tensors`
  (see plan_module); raises CheckpointError listing every problem."""
  return plan_module(factory, tensors, rules, source=source, ignore=ignore).materialize()


def _fix_int_keys(flat):
  # nnx paths can hold ints (list indices); our string paths turn them back.
  return [(tuple(int(p) if p.isdigit() else p for p in path), v) for path, v in flat]


def export_state_dict(module: nnx.Module, rules: list[Rule], dtype=None) -> dict[str, np.ndarray]:
  """The torch-layout state dict of `module`, driven by the same table as import."""
  ours = {_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  out = {}
  for rule in rules:
    arr = np.asarray(jax.device_get(ours[rule.ours]))
    if dtype is not None:
      arr = arr.astype(dtype)
    if rule.stacked:
      for i in range(arr.shape[0]):
        out[rule.torch.replace("{i}", str(i))] = np.ascontiguousarray(rule.transform.to_torch(arr[i]))
    else:
      out[rule.torch] = np.ascontiguousarray(rule.transform.to_torch(arr))
  return out
