"""Writing PyTorch-side files without torch: safetensors (metadata {"format": "pt"}, bf16 through
ml_dtypes, sharded with an index when large) and diffusers model folders (config.json +
diffusion_pytorch_model.safetensors) that `from_pretrained` on either side reads."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from safetensors.numpy import save_file

DIFFUSERS_VERSION = "0.30.0"


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  """One .safetensors file, written atomically (a temporary name, then a rename); `metadata`
  (strings) joins {"format": "pt"} in its header."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata={"format": "pt", **(metadata or {})})
  os.replace(tmp, path)


def save_sharded(tensors: dict[str, np.ndarray], folder: str, name: str = "model",
                 max_shard_bytes: int = 5 << 30) -> list[str]:
  """`<name>.safetensors`, or `<name>-0000i-of-0000n.safetensors` + `<name>.safetensors.index.json`
  when the tensors exceed `max_shard_bytes` (transformers' layout). Returns the files written."""
  shards, current, size = [], {}, 0
  for k, v in tensors.items():
    if current and size + v.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[k] = v
    size += v.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_safetensors(shards[0], os.path.join(folder, f"{name}.safetensors"))
    return [f"{name}.safetensors"]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_safetensors(shard, os.path.join(folder, fname))
    files.append(fname)
    weight_map.update({k: fname for k in shard})
  index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
  with open(os.path.join(folder, f"{name}.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return files


def vae_config(cfg) -> dict:
  """diffusers AutoencoderKL config.json fields of a VAEConfig."""
  d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dtype", "param_dtype")}
  d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
  return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu", **d}


def unet_config(cfg) -> dict:
  """diffusers UNet2DConditionModel config.json fields of a UNetConfig."""
  skip = ("dtype", "param_dtype", "remat", "attention_impl")
  d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
  return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
          "mid_block_type": "UNetMidBlock2DCrossAttn", "center_input_sample": False, **d}


def save_diffusers(tensors: dict[str, np.ndarray], config: dict, folder: str) -> None:
  """A diffusers model folder: config.json and diffusion_pytorch_model.safetensors."""
  os.makedirs(folder, exist_ok=True)
  save_safetensors(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
