"""Mapping tables and loaders for the diffusion half: UNet2DConditionModel and AutoencoderKL.

Our modules mirror diffusers' module names, so each table is derived from the model's
parameter paths by a short list of renames and a transform per parameter kind.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.convert.mapping import CONV, IDENTITY, LINEAR, Rule, plan_module
from mgie_jax.convert.mllm import Renamed, check_arch, runtime_kwargs
from mgie_jax.convert.torch_files import CheckpointError, open_weights, read_config, shape_of
from mgie_jax.models.unet import UNet2DConditionModel, UNetConfig
from mgie_jax.models.vae import AutoencoderKL, VAEConfig

# our path fragment -> diffusers key fragment
RENAMES = (
    (r"\.ff\.proj\.", ".ff.net.0.proj."),     # GEGLU projection lives in ff.net[0].proj
    (r"\.ff\.out\.", ".ff.net.2."),           # output Linear is ff.net[2]
)
# legacy diffusers VAE attention names -> current ones
LEGACY_VAE = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
              (".proj_attn.", ".to_out.0."))


def derived_rules(module: nnx.Module) -> list[Rule]:
  """One Rule per parameter of `module` (real or abstract): rename the path, `kernel` ->
  `weight` with a conv (OIHW) or linear ([out, in]) transform, `scale` -> `weight`."""
  rules = []
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    ours = ".".join(map(str, path))
    torch = "." + ours
    for pat, rep in RENAMES:
      torch = re.sub(pat, rep, torch)
    torch = torch[1:]
    leaf, ndim = path[-1], len(var.get_value().shape)
    if leaf == "kernel":
      rules.append(Rule(torch[:-len("kernel")] + "weight", ours, CONV if ndim == 4 else LINEAR))
    elif leaf == "scale":
      rules.append(Rule(torch[:-len("scale")] + "weight", ours, IDENTITY))
    else:
      rules.append(Rule(torch, ours, IDENTITY))
  return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
  return derived_rules(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))))


def vae_rules(cfg: VAEConfig) -> list[Rule]:
  return derived_rules(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))


def _legacy_vae_key(key: str) -> str:
  for old, new in LEGACY_VAE:
    if ".attentions." in key and old in key:
      return key.replace(old, new)
  return key


def _widen(tensors, in_channels: int, source: str):
  """A view of a 4-channel SD state dict whose conv_in takes `in_channels`, the extra ones zero."""
  w = tensors["conv_in.weight"]
  if w.shape[1] == in_channels:
    return tensors
  if w.shape[1] > in_channels:
    raise CheckpointError(source, [f"conv_in has {w.shape[1]} input channels, cannot narrow to {in_channels}"])
  # A lazy overlay: only conv_in is materialised, every other tensor is read when needed.
  return collections.ChainMap({"conv_in.weight": widen_conv_in_weight(w, in_channels)}, tensors)


def widen_conv_in_weight(w: np.ndarray, in_channels: int) -> np.ndarray:
  """OIHW conv_in weight [C, 4, k, k] -> [C, in_channels, k, k]; channels 0-3 copied, the rest zero."""
  out = np.zeros((w.shape[0], in_channels) + w.shape[2:], w.dtype)
  out[:, :w.shape[1]] = w
  return out


def widen_unet(unet: UNet2DConditionModel, in_channels: int = 8) -> UNet2DConditionModel:
  """InstructPix2Pix's widening: a copy of `unet` whose conv_in takes `in_channels` (extra ones zero)."""
  cfg = dataclasses.replace(unet.config, in_channels=in_channels)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))))
  src = nnx.state(unet)
  kernel = src["conv_in"]["kernel"][...]
  pad = in_channels - kernel.shape[2]
  if pad < 0:
    raise ValueError(f"conv_in already has {kernel.shape[2]} input channels > {in_channels}")
  flat = dict(nnx.to_flat_state(src))
  flat[("conv_in", "kernel")] = flat[("conv_in", "kernel")].replace(
      jnp.pad(kernel, ((0, 0), (0, 0), (0, pad), (0, 0))))
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


UNET_ARCHS = ("UNet2DConditionModel",)
VAE_ARCHS = ("AutoencoderKL",)


def _diffusers_config(path: str, allowed) -> dict:
  hf = read_config(path)
  cls = hf.get("_class_name")
  if cls and cls not in allowed:
    raise CheckpointError(path, [f"unknown architecture {cls!r} in config.json; this loader reads {list(allowed)}"])
  check_arch(path, hf, allowed)
  return hf


def _load_unet(tensors, hf: dict, source: str, in_channels, dtype, runtime):
  runtime = runtime_kwargs(dtype, runtime) if dtype is not None else runtime
  if in_channels is not None:
    tensors = _widen(tensors, in_channels, source)
    hf = {**hf, "in_channels": in_channels}
  cfg = UNetConfig.from_hf(hf, **runtime)
  return cfg, plan_module(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), tensors, derived_rules,
                          source=source)


def unet_plan(path: str, *, in_channels: int | None = None, **runtime):
  """(UNetConfig, ModulePlan) of a diffusers UNet folder (or a pipeline folder holding unet/);
  `in_channels=8` widens an SD UNet for InstructPix2Pix on the fly."""
  if os.path.isdir(os.path.join(path, "unet")) and not os.path.exists(os.path.join(path, "config.json")):
    path = os.path.join(path, "unet")
  hf = _diffusers_config(path, UNET_ARCHS)
  return _load_unet(open_weights(path), hf, path, in_channels, None, runtime)


def unet_plan_from_state_dict(file: str, config, *, in_channels: int | None = None, **runtime):
  """(UNetConfig, ModulePlan) of a bare UNet state dict (MGIE's released `unet.pt`, or
  .safetensors) given its config: a diffusers config dict, a folder holding config.json, or a
  config.json path."""
  if isinstance(config, str):
    cpath = os.path.join(config, "config.json") if os.path.isdir(config) else config
    with open(cpath) as f:
      config = json.load(f)
  tensors = open_weights(file)
  if in_channels is None and "conv_in.weight" in tensors:
    in_channels = int(shape_of(tensors, "conv_in.weight")[1])   # unet.pt carries the widened conv_in
  return _load_unet(tensors, config, file, in_channels, None, runtime)


def unet_from_pretrained(path: str, dtype=None, *, in_channels: int | None = None,
                         **runtime) -> UNet2DConditionModel:
  """A diffusers UNet folder; `in_channels=8` widens an SD UNet for InstructPix2Pix on the fly."""
  return unet_plan(path, in_channels=in_channels, **runtime_kwargs(dtype, runtime))[1].materialize()


def unet_from_state_dict(file: str, config, dtype=None, *, in_channels: int | None = None,
                         **runtime) -> UNet2DConditionModel:
  """A bare UNet state dict (MGIE's released `unet.pt`, or .safetensors) given its config."""
  return unet_plan_from_state_dict(file, config, in_channels=in_channels,
                                   **runtime_kwargs(dtype, runtime))[1].materialize()


def vae_source(path: str, **runtime):
  """(VAEConfig, the folder's tensors under current diffusers names, the table, the folder used)."""
  if os.path.isdir(os.path.join(path, "vae")) and not os.path.exists(os.path.join(path, "config.json")):
    path = os.path.join(path, "vae")
  hf = _diffusers_config(path, VAE_ARCHS)
  cfg = VAEConfig.from_hf(hf, **runtime)
  return cfg, Renamed([(open_weights(path), _legacy_vae_key)]), vae_rules(cfg), path


def vae_plan(path: str, **runtime):
  """(VAEConfig, ModulePlan) of a diffusers VAE folder (or a pipeline folder holding vae/)."""
  cfg, tensors, rules, path = vae_source(path, **runtime)
  return cfg, plan_module(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), tensors, rules, source=path)


def vae_from_pretrained(path: str, dtype=None, **runtime) -> AutoencoderKL:
  return vae_plan(path, **runtime_kwargs(dtype, runtime))[1].materialize()
