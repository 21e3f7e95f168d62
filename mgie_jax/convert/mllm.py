"""Mapping tables and `from_pretrained` for the MLLM half: CLIP vision, LLaMA, LLaVA.

Each table maps transformers' state-dict keys to our parameter paths; the same
table serves export (mgie_jax.convert.mapping.export_state_dict).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping

from flax import nnx

from mgie_jax.convert.mapping import CONV, LINEAR, Rule, load_module, prefixed
from mgie_jax.convert.torch_files import CheckpointError, open_weights, read_config, shape_of
from mgie_jax.models.clip import ClipVisionConfig, ClipVisionModel
from mgie_jax.models.llama import LlamaConfig, LlamaForCausalLM
from mgie_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration


def linear_rules(torch: str, ours: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch}.weight", f"{ours}.kernel", LINEAR)]
  return rules + [Rule(f"{torch}.bias", f"{ours}.bias")] if bias else rules


def norm_rules(torch: str, ours: str) -> list[Rule]:
  return [Rule(f"{torch}.weight", f"{ours}.scale"), Rule(f"{torch}.bias", f"{ours}.bias")]


# --- tables ----------------------------------------------------------------------------------

def clip_vision_rules() -> list[Rule]:
  """transformers 5 CLIPVisionModel keys -> ClipVisionModel (older `vision_model.` keys are renamed)."""
  layer = "encoder.layers.{i}"
  rules = [
      Rule("embeddings.class_embedding", "class_embedding"),
      Rule("embeddings.patch_embedding.weight", "patch_embedding.kernel", CONV),
      Rule("embeddings.position_embedding.weight", "position_embedding.embedding"),
      *norm_rules("pre_layrnorm", "pre_layrnorm"),
      *norm_rules("post_layernorm", "post_layernorm"),
  ]
  for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules += linear_rules(f"{layer}.self_attn.{p}", f"layers.self_attn.{p}")
  rules += norm_rules(f"{layer}.layer_norm1", "layers.layer_norm1")
  rules += norm_rules(f"{layer}.layer_norm2", "layers.layer_norm2")
  rules += linear_rules(f"{layer}.mlp.fc1", "layers.fc1") + linear_rules(f"{layer}.mlp.fc2", "layers.fc2")
  return rules


def llama_model_rules(cfg: LlamaConfig) -> list[Rule]:
  """transformers LlamaModel keys (no `model.` prefix) -> LlamaModel."""
  layer = "layers.{i}"
  rules = [Rule("embed_tokens.weight", "embed_tokens.embedding"), Rule("norm.weight", "norm.weight"),
           Rule(f"{layer}.input_layernorm.weight", "layers.input_layernorm.weight"),
           Rule(f"{layer}.post_attention_layernorm.weight", "layers.post_attention_layernorm.weight")]
  for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules += linear_rules(f"{layer}.self_attn.{p}", f"layers.self_attn.{p}", cfg.attention_bias)
  for p in ("gate_proj", "up_proj", "down_proj"):
    rules += linear_rules(f"{layer}.mlp.{p}", f"layers.mlp.{p}", cfg.mlp_bias)
  return rules


def llama_rules(cfg: LlamaConfig) -> list[Rule]:
  rules = prefixed(llama_model_rules(cfg), "model.", "model.")
  if not cfg.tie_word_embeddings:
    rules += [Rule("lm_head.weight", "lm_head.kernel", LINEAR)]
  return rules


def projector_rules(cfg: LlavaConfig, torch_prefix: str) -> list[Rule]:
  """LLaVA v1 names its projector `mm_projector` (an nn.Sequential for the MLP); llava-hf `linear_1/2`."""
  if cfg.layout == "v1":
    first, second = ("", None) if cfg.projector == "linear" else (".0", ".2")
  else:
    first, second = "linear_1", "linear_2"
  bias = cfg.projector_bias
  rules = linear_rules(f"{torch_prefix}{first}", "multi_modal_projector.linear_1", bias)
  if cfg.projector == "mlp2x_gelu":
    rules += linear_rules(f"{torch_prefix}{second}", "multi_modal_projector.linear_2", bias)
  return rules


def llava_rules(cfg: LlavaConfig) -> list[Rule]:
  """HF llava-hf keys (transformers >= 4.52 naming) or LLaVA v1 keys -> LlavaForConditionalGeneration."""
  text = cfg.text
  if cfg.layout == "hf":
    rules = prefixed(clip_vision_rules(), "model.vision_tower.", "vision_tower.")
    rules += projector_rules(cfg, "model.multi_modal_projector.")
    rules += prefixed(llama_model_rules(text), "model.language_model.", "language_model.model.")
    if not text.tie_word_embeddings:
      rules += [Rule("lm_head.weight", "language_model.lm_head.kernel", LINEAR)]
    return rules
  rules = prefixed(clip_vision_rules(), V1_TOWER, "vision_tower.")
  rules += projector_rules(cfg, "model.mm_projector")
  rules += prefixed(llama_rules(text), "", "language_model.")
  return rules


V1_TOWER = "model.vision_tower.vision_tower."   # where LLaVA keeps CLIP's `vision_model.*` keys
IGNORED = (r".*rotary_emb\.inv_freq$", r".*position_ids$")
CLIP_EXTRAS = (r"^text_model\.", r"^(text|visual)_projection\.", r"^logit_scale$")


# --- key views -------------------------------------------------------------------------------

class Renamed(Mapping):
  """A read-only view of a tensor mapping under other key names (new name -> old name)."""

  def __init__(self, parts: list[tuple[Mapping, callable]]):
    self._parts = {}
    for tensors, rename in parts:
      for k in tensors:
        new = rename(k)
        if new is not None:
          self._parts[new] = (tensors, k)

  def __getitem__(self, key):
    tensors, old = self._parts[key]
    return tensors[old]

  def shape(self, key):
    tensors, old = self._parts[key]
    return shape_of(tensors, old)

  def __iter__(self) -> Iterator[str]:
    return iter(self._parts)

  def __len__(self):
    return len(self._parts)


def _strip_vision_model(key: str, prefix: str = "") -> str:
  """CLIPModel and transformers 4 CLIPVisionModel keep vision keys under `vision_model.`."""
  inner = prefix + "vision_model."
  return prefix + key[len(inner):] if key.startswith(inner) else key


def _legacy_llava_hf(key: str) -> str:
  """transformers < 4.52 saved llava-hf without the top-level `model.` wrapper."""
  key = _strip_vision_model(key, "vision_tower.")
  key = _strip_vision_model(key, "model.vision_tower.")
  for old, new in (("language_model.model.", "model.language_model."),
                   ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")):
    if key.startswith(old):
      return new + key[len(old):]
  return key


def _is_clip_extra(key: str) -> bool:
  return any(re.match(p, key) for p in CLIP_EXTRAS)


def check_arch(folder: str, hf: dict, allowed: tuple[str, ...]) -> None:
  archs = hf.get("architectures") or []
  if archs and not set(archs) & set(allowed):
    raise CheckpointError(folder, [f"unknown architecture {archs} in config.json; this loader reads {list(allowed)}"])


def runtime_kwargs(dtype, kw: dict) -> dict:
  if dtype is not None:
    kw.setdefault("dtype", str(dtype.__name__ if hasattr(dtype, "__name__") else dtype))
    kw.setdefault("param_dtype", kw["dtype"])
  return kw


# --- loaders ---------------------------------------------------------------------------------

CLIP_ARCHS = ("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection")
LLAMA_ARCHS = ("LlamaForCausalLM",)
LLAVA_HF_ARCHS = ("LlavaForConditionalGeneration",)
LLAVA_V1_ARCHS = ("LlavaLlamaForCausalLM", "MGIELlavaLlamaForCausalLM")


def clip_vision_from_pretrained(path: str, dtype=None, **runtime) -> ClipVisionModel:
  hf = read_config(path)
  check_arch(path, hf, CLIP_ARCHS)
  cfg = ClipVisionConfig.from_hf(hf, **runtime_kwargs(dtype, runtime))
  tensors = Renamed([(open_weights(path), _strip_vision_model)])
  ignore = IGNORED + CLIP_EXTRAS
  return load_module(lambda: ClipVisionModel(cfg, rngs=nnx.Rngs(0)), tensors, clip_vision_rules(),
                     source=path, ignore=ignore)


def llama_from_pretrained(path: str, dtype=None, **runtime) -> LlamaForCausalLM:
  hf = read_config(path)
  check_arch(path, hf, LLAMA_ARCHS)
  cfg = LlamaConfig.from_hf(hf, **runtime_kwargs(dtype, runtime))
  ignore = IGNORED + ((r"^lm_head\.weight$",) if cfg.tie_word_embeddings else ())
  return load_module(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), open_weights(path),
                     llama_rules(cfg), source=path, ignore=ignore)


def _is_llava_hf(hf: dict) -> bool:
  # LLaVA v1 configs also say model_type "llava", but they are flat LLaMA configs.
  return "text_config" in hf or bool(set(hf.get("architectures") or []) & set(LLAVA_HF_ARCHS))


def llava_config_from_hf(hf: dict, vision_hf: dict | None = None, **runtime) -> LlavaConfig:
  if _is_llava_hf(hf):
    proj_act = hf.get("projector_hidden_act", "gelu")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
      raise ValueError(f"vision_feature_layer {layer} (several layers) is not supported")
    return LlavaConfig(
        vision=ClipVisionConfig.from_hf(hf["vision_config"], **runtime),
        text=LlamaConfig.from_hf(hf["text_config"], **runtime),
        projector="mlp2x_gelu", projector_act=proj_act,
        projector_bias=hf.get("multimodal_projector_bias", True),
        vision_feature_layer=layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
        layout="hf")
  if vision_hf is None:
    raise ValueError("a LLaVA v1 config needs the vision tower's config")
  projector = hf.get("mm_projector_type", "linear")
  return LlavaConfig(
      vision=ClipVisionConfig.from_hf(vision_hf, **runtime),
      text=LlamaConfig.from_hf(hf, **runtime),
      projector=projector, vision_feature_layer=hf.get("mm_vision_select_layer", -2),
      vision_feature_select_strategy="default",
      image_token_id=hf.get("im_patch_token", 32000), layout="v1")


def llava_source(path: str, vision_tower: str | None = None, **runtime):
  """(LlavaConfig, a lazy view of the folder's tensors under the table's key names, the table,
  keys to ignore) of a LLaVA folder: transformers' llava-hf layout, or LLaVA v1 (MGIE's).

  A LLaVA v1 folder usually leaves CLIP out; give its folder as `vision_tower` (or put a local
  path in config.json's `mm_vision_tower`).
  """
  hf = read_config(path)
  check_arch(path, hf, LLAVA_HF_ARCHS + LLAVA_V1_ARCHS)
  tensors = open_weights(path)
  if _is_llava_hf(hf):
    cfg = llava_config_from_hf(hf, **runtime)
    return cfg, Renamed([(tensors, _legacy_llava_hf)]), llava_rules(cfg), IGNORED
  tower_keys = [k for k in tensors if k.startswith("model.vision_tower.")]
  if tower_keys:   # LLaVA-1.x folder that carries its own CLIP weights
    tensors = Renamed([(tensors, lambda k: _strip_vision_model(k, V1_TOWER))])
    if vision_tower is None:
      raise CheckpointError(path, ["this LLaVA folder holds CLIP weights but no CLIP config; "
                                   "pass vision_tower=<CLIP folder> for its config"])
    vision_hf = read_config(vision_tower)
  else:
    vision_tower = vision_tower or hf.get("mm_vision_tower")
    if not vision_tower or not os.path.isdir(vision_tower):
      raise CheckpointError(path, [
          f"LLaVA v1 folder without CLIP weights; mm_vision_tower={hf.get('mm_vision_tower')!r} is not "
          "a local folder: pass vision_tower=<folder written by CLIPVisionModel.save_pretrained>"])
    vision_hf = read_config(vision_tower)
    check_arch(vision_tower, vision_hf, CLIP_ARCHS)
    clip = open_weights(vision_tower)
    keep = lambda k: None if _is_clip_extra(k) else V1_TOWER + _strip_vision_model(k)
    tensors = Renamed([(tensors, lambda k: k), (clip, keep)])
  cfg = llava_config_from_hf(hf, vision_hf, **runtime)
  return cfg, tensors, llava_rules(cfg), IGNORED


def llava_from_pretrained(path: str, dtype=None, *, vision_tower: str | None = None,
                          **runtime) -> LlavaForConditionalGeneration:
  """Load a LLaVA folder: transformers' llava-hf layout, or LLaVA v1 (MGIE's) layout (see llava_source)."""
  cfg, tensors, rules, ignore = llava_source(path, vision_tower, **runtime_kwargs(dtype, runtime))
  return load_module(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), tensors, rules,
                     source=path, ignore=ignore)
