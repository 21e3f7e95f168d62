"""Reading PyTorch-side checkpoints without executing anything they contain.

Folders written by transformers/diffusers `save_pretrained` (safetensors, sharded
or not, or `.bin`), and bare state-dict files (`.safetensors`, `.pt`, `.bin`).
`.bin`/`.pt` go through `torch.load(weights_only=True)`; nothing is unpickled
beyond tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
  """A checkpoint does not fit the model; the message lists every problem found."""

  def __init__(self, source: str, problems: list[str]):
    self.problems = list(problems)
    lines = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"cannot load {source}: {len(self.problems)} problem(s)\n{lines}")


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise CheckpointError(folder, [f"{folder} is not a directory"])
  if not os.path.exists(path):
    raise CheckpointError(folder, [f"config.json is missing in {folder}"])
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(folder, [f"config.json is not valid JSON: {e}"]) from None


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # only needed for .bin/.pt files
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(path, ["reading .bin/.pt files needs torch: pip install 'mgie_jax[torch]'"]) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # weights_only refuses arbitrary objects: say so clearly
    raise CheckpointError(path, [f"torch.load(weights_only=True) failed: {e}"]) from None
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(path, [f"expected a state dict, found {type(obj).__name__}"])
  out, bad = {}, []
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[k] = _torch_to_numpy(v)
    else:
      bad.append(f"{k!r} is a {type(v).__name__}, not a tensor")
  if bad:
    raise CheckpointError(path, bad)
  return out


class TensorSource(Mapping):
  """A lazy name -> numpy array view over one or more weight files."""

  def __init__(self, files: list[str], source: str):
    self.source = source
    self._where: dict[str, str] = {}
    self._eager: dict[str, np.ndarray] = {}
    for path in files:
      if not os.path.exists(path):
        raise CheckpointError(source, [f"weight file {path} is missing"])
      if path.endswith(".safetensors"):
        try:
          with safe_open(path, framework="numpy") as f:
            for k in f.keys():
              self._where[k] = path
        except Exception as e:
          raise CheckpointError(source, [f"{path} is not a readable safetensors file: {e}"]) from None
      else:
        self._eager.update(_load_torch_file(path))

  def __getitem__(self, key: str) -> np.ndarray:
    if key in self._eager:
      return self._eager[key]
    path = self._where[key]
    try:
      with safe_open(path, framework="numpy") as f:
        return f.get_tensor(key)
    except TypeError:  # bfloat16 has no numpy dtype in safetensors: read through JAX on the host
      with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
        return np.asarray(f.get_tensor(key))

  def shape(self, key: str) -> tuple:
    """The tensor's shape, read from the file's header (no data is read)."""
    if key in self._eager:
      return tuple(self._eager[key].shape)
    with safe_open(self._where[key], framework="numpy") as f:
      return tuple(f.get_slice(key).get_shape())

  def __iter__(self) -> Iterator[str]:
    yield from self._where
    yield from self._eager

  def __len__(self) -> int:
    return len(self._where) + len(self._eager)


def shape_of(tensors, key: str) -> tuple:
  """A tensor's shape without reading it where the mapping can tell (safetensors headers)."""
  if hasattr(tensors, "shape") and callable(tensors.shape):
    return tuple(tensors.shape(key))
  maps = getattr(tensors, "maps", None)           # collections.ChainMap overlays
  if maps is not None:
    for m in maps:
      if key in m:
        return shape_of(m, key)
  return tuple(np.shape(tensors[key]))


def open_weights(path: str) -> TensorSource:
  """Open a save_pretrained folder (or a single weight file) as a lazy tensor mapping."""
  if os.path.isfile(path):
    return TensorSource([path], path)
  if not os.path.isdir(path):
    raise CheckpointError(path, [f"{path} does not exist"])
  for name in WEIGHT_FILES:
    full = os.path.join(path, name)
    if not os.path.exists(full):
      continue
    if name.endswith(".index.json"):
      with open(full) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return TensorSource([os.path.join(path, s) for s in shards], path)
    return TensorSource([full], path)
  raise CheckpointError(path, [f"no weight file in {path}; looked for {', '.join(WEIGHT_FILES)}"])
