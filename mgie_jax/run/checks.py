"""Checks of a training config against the machine and the filesystem, made before any model is
built or compiled: every mistake a user can make becomes one UserError line."""

from __future__ import annotations

import json
import math
import os

from etils import epath

from mgie_jax.core import errors, parallel
from mgie_jax.diffusion.samplers import KINDS
from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.run.model import FEATURE_TOWERS, config_rules, model_kind, pretrained, template
from mgie_jax.text import TEMPLATES


def mesh_sizes(mesh: dict, devices: int) -> dict:
  """The mesh's axis sizes for `devices` devices (one size may be -1), or a UserError."""
  sizes = {k: int(mesh.get(k, 1)) for k in parallel.MESH_AXES}
  free = [k for k, v in sizes.items() if v == -1]
  known = math.prod(v for v in sizes.values() if v != -1)
  if len(free) > 1 or known <= 0 or (free and devices % known) or (not free and known != devices):
    raise errors.MESH_DEVICES(mesh=dict(mesh), devices=devices)
  if free:
    sizes[free[0]] = devices // known
  return sizes


def batch_ways(sizes: dict, rules) -> int:
  """How many ways the 'batch' logical axis is split over the mesh."""
  for name, axes in rules:
    if name == "batch":
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      return math.prod(sizes[a] for a in axes)
  return 1


def check_batch(c, devices: int, processes: int) -> None:
  sizes = mesh_sizes(dict(c.mesh), devices)
  ways = batch_ways(sizes, config_rules(c))
  b, accum = int(c.train.batch_size), int(c.train.grad_accum)
  if accum < 1:
    raise errors.BAD_OPTION(flag="--config.train.grad_accum", detail=f"{accum}", fix="use 1 or more")
  if b < 1 or b % ways:
    suggestion = max(ways, -(-b // ways) * ways)     # the next multiple up: what a user usually wants
    raise errors.BATCH_MESH(name="train.batch_size", batch=b, ways=ways, suggestion=suggestion)
  if b % processes:
    raise errors.BATCH_HOSTS(name="train.batch_size", batch=b, hosts=processes)
  if b % (accum * ways):
    raise errors.GRAD_ACCUM(batch=b, accum=accum, ways=ways)
  shards = int(c.data.shards or processes)
  if shards % processes or (b // processes) % (shards // processes):
    raise errors.BAD_OPTION(flag="--config.data.shards", detail=f"{shards} data shards over {processes} "
                            f"processes with a per-process batch of {b // processes}",
                            fix="use a multiple of the process count that divides the per-process batch")


def check_dataset(path: str, name: str, splits=("train",), extra: str = "") -> None:
  p = epath.Path(path)
  if not (p / "dataset_info.json").exists():
    raise errors.NOT_A_DATASET(name=name, path=path, extra=extra)
  info = json.loads((p / "dataset_info.json").read_text())
  have = [s.get("name") for s in info.get("splits", [])]
  for split in splits:
    if split not in have:
      raise errors.NO_SPLIT(path=path, split=split, splits=", ".join(map(str, have)) or "none")


def check_tokenizer(path: str, name: str) -> None:
  if not (epath.Path(path) / "tokenizer.model").exists():
    raise errors.NO_TOKENIZER(name=name, path=path)


def check_folder(path: str, name: str) -> None:
  if not epath.Path(path).is_dir():
    raise errors.PRETRAINED_MISSING(name=name, path=path)


def check_file(path: str, name: str) -> None:
  if not epath.Path(path).is_file():
    raise errors.PRETRAINED_MISSING(name=name, path=path)


def check_training_config(c, devices: int, processes: int) -> None:
  """Everything about a training config that can be checked without building a model."""
  if int(c.train.steps) < 1:
    raise errors.BAD_OPTION(flag="--config.train.steps", detail=f"{c.train.steps}", fix="use 1 or more")
  check_batch(c, devices, processes)
  if not 0.0 <= float(c.train.get("ema_decay", 0.0)) < 1.0:
    raise errors.BAD_OPTION(flag="--config.train.ema_decay", detail=f"{c.train.ema_decay}",
                            fix="use 0 (no EMA) or a decay below 1, e.g. 0.999")
  if template(c) not in TEMPLATES:
    raise errors.BAD_OPTION(flag="--config.model.template", detail=repr(template(c)), fix=f"use one of {', '.join(TEMPLATES)}")
  if template(c) == "llava_1_5" and c.model.init != "pretrained" and model_kind(c) == "mgie":
    raise errors.BAD_OPTION(flag="--config.model.template", detail=f"{template(c)!r} is the prompt of a pretrained "
                            "LLaVA-1.5 folder", fix="set config.model.init=pretrained and config.pretrained.llava, "
                            "or use llava_v1 for a randomly initialised model")
  sampler = c.get("eval", {}).get("sampler", "euler_ancestral")
  if sampler not in KINDS:
    raise errors.BAD_OPTION(flag="--config.eval.sampler", detail=repr(sampler), fix=f"use one of {', '.join(KINDS)}")
  noise = dict(c.model.get("noise", None) or {})
  if noise:                # the schedule's own checks, made before any model is built
    try:
      NoiseSchedule(**noise)
    except (TypeError, ValueError) as e:
      raise errors.BAD_OPTION(flag="--config.model.noise", detail=str(e), fix="change those noise options")
  for b in c.data.get("length_buckets", None) or ():
    if not 0 < int(b) <= int(c.data.max_length):
      raise errors.BAD_OPTION(flag="--config.data.length_buckets", detail=f"{b} is not in 1..max_length "
                              f"({c.data.max_length})", fix="list token lengths up to data.max_length")
  if c.data.dir:
    ev = c.get("eval", {})
    splits = ["train"] + (["validation"] if c.log.sample_every else [])      # the sample grid's
    if ev.get("every") or ev.get("at_end"):
      splits.append(ev.get("split", "validation"))
    splits = tuple(dict.fromkeys(splits))
    check_dataset(c.data.dir, "config.data.dir", splits,
                  extra=", or leave config.data.dir empty for the built-in synthetic data")
  if c.data.get("features", ""):
    if model_kind(c) != "mgie":
      raise errors.BAD_OPTION(flag="--config.data.features", detail=f"model.kind={model_kind(c)!r} reads images",
                              fix="frozen features are MGIE's; leave config.data.features empty")
    trained = frozen_feature_towers_trained(c)
    if trained:
      raise errors.FEATURES_TRAINED(detail=trained)
  if c.data.get("expressive", ""):
    check_file(c.data.expressive, "config.data.expressive")
  if c.data.tokenizer:
    check_tokenizer(c.data.tokenizer, "config.data.tokenizer")
  elif c.data.dir and not pretrained(c, "llava"):
    raise errors.NO_TOKENIZER(name="config.data.tokenizer", path="(empty)")
  if c.model.init == "pretrained":
    for key in ("llava", "sd"):
      if not pretrained(c, key):
        raise errors.PRETRAINED_MISSING(name=f"config.pretrained.{key}", path="(empty)")
    for key in ("llava", "sd", "vision_tower", "vae"):
      if pretrained(c, key) and pretrained(c, key) != "synthetic":
        check_folder(pretrained(c, key), f"config.pretrained.{key}")
    if not c.data.tokenizer:
      check_tokenizer(pretrained(c, "llava"), "config.pretrained.llava")
    for key in ("mllm_pt", "unet_pt"):
      if pretrained(c, key):
        check_file(pretrained(c, key), f"config.pretrained.{key}")
  elif pretrained(c, "vae") and pretrained(c, "vae") != "synthetic":
    check_folder(pretrained(c, "vae"), "config.pretrained.vae")


def frozen_feature_towers_trained(c) -> str:
  """The trainable prefix that covers the VAE or the CLIP tower, or "" (a cache needs them frozen)."""
  for p in c.trainable:
    for t in FEATURE_TOWERS:
      if p == t or t.startswith(p + ".") or p.startswith(t + "."):
        return f"config.trainable {p!r}"
  return ""


def local_path(path: str) -> bool:
  return "://" not in str(path) or str(path).startswith("file://")


def ensure_parent(path: str) -> None:
  if local_path(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
