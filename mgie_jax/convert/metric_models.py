"""Mapping tables and loaders for the evaluation models: CLIP (both towers, transformers'
CLIPModel folder), DINO ViT (transformers' ViTModel folder) and LPIPS (torchvision AlexNet/VGG16
weights + the `lpips` package's linear heads, both PyTorch files read with weights_only=True)."""

from __future__ import annotations

import re

from flax import nnx

from mgie_jax.convert.mapping import CONV, IDENTITY, Rule, Transform, load_module, prefixed
from mgie_jax.convert.mllm import (IGNORED, Renamed, check_arch, clip_vision_rules, linear_rules, norm_rules,
                                   runtime_kwargs)
from mgie_jax.convert.torch_files import CheckpointError, open_weights, read_config
from mgie_jax.models.clip import ClipModel, ClipTextConfig, ClipTextModel, ClipVisionConfig
from mgie_jax.models.lpips import LPIPS, NETS, LPIPSConfig
from mgie_jax.models.vit import ViTConfig, ViTModel


def clip_text_rules() -> list[Rule]:
  layer = "encoder.layers.{i}"
  rules = [Rule("embeddings.token_embedding.weight", "token_embedding.embedding"),
           Rule("embeddings.position_embedding.weight", "position_embedding.embedding"),
           *norm_rules("final_layer_norm", "final_layer_norm")]
  for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules += linear_rules(f"{layer}.self_attn.{p}", f"layers.self_attn.{p}")
  rules += norm_rules(f"{layer}.layer_norm1", "layers.layer_norm1")
  rules += norm_rules(f"{layer}.layer_norm2", "layers.layer_norm2")
  rules += linear_rules(f"{layer}.mlp.fc1", "layers.fc1") + linear_rules(f"{layer}.mlp.fc2", "layers.fc2")
  return rules


def clip_rules() -> list[Rule]:
  """transformers CLIPModel keys -> ClipModel."""
  return (prefixed(clip_vision_rules(), "vision_model.", "vision_model.")
          + prefixed(clip_text_rules(), "text_model.", "text_model.")
          + linear_rules("visual_projection", "visual_projection", bias=False)
          + linear_rules("text_projection", "text_projection", bias=False))


def clip_from_pretrained(path: str, dtype=None, **runtime) -> ClipModel:
  hf = read_config(path)
  check_arch(path, hf, ("CLIPModel",))
  if "text_config" not in hf or "vision_config" not in hf:
    raise CheckpointError(path, ["config.json is not a CLIPModel config (needs text_config and vision_config)"])
  runtime = runtime_kwargs(dtype, runtime)
  vision, text = ClipVisionConfig.from_hf(hf["vision_config"], **runtime), ClipTextConfig.from_hf(hf["text_config"], **runtime)
  dim = hf.get("projection_dim", 512)
  return load_module(lambda: ClipModel(vision, text, dim, rngs=nnx.Rngs(0)), open_weights(path), clip_rules(),
                     source=path, ignore=IGNORED + (r"^logit_scale$",))


# --- ViT (DINO) ----------------------------------------------------------------------------------

# cls_token [1, 1, D] and position_embeddings [1, N, D] are the same shape on both sides.
def vit_rules(cfg: ViTConfig) -> list[Rule]:
  layer = "encoder.layer.{i}"
  rules = [Rule("embeddings.cls_token", "cls_token", IDENTITY),
           Rule("embeddings.position_embeddings", "position_embeddings", IDENTITY),
           Rule("embeddings.patch_embeddings.projection.weight", "patch_embedding.kernel", CONV),
           Rule("embeddings.patch_embeddings.projection.bias", "patch_embedding.bias"),
           *norm_rules("layernorm", "layernorm"),
           *norm_rules(f"{layer}.layernorm_before", "layers.layernorm_before"),
           *norm_rules(f"{layer}.layernorm_after", "layers.layernorm_after"),
           *linear_rules(f"{layer}.attention.output.dense", "layers.attention_output"),
           *linear_rules(f"{layer}.intermediate.dense", "layers.intermediate"),
           *linear_rules(f"{layer}.output.dense", "layers.output")]
  for p in ("query", "key", "value"):
    rules += linear_rules(f"{layer}.attention.attention.{p}", f"layers.{p}", cfg.qkv_bias)
  return rules


def vit_from_pretrained(path: str, dtype=None, **runtime) -> ViTModel:
  hf = read_config(path)
  check_arch(path, hf, ("ViTModel", "ViTForImageClassification"))
  cfg = ViTConfig.from_hf(hf, **runtime_kwargs(dtype, runtime))
  # ViTForImageClassification keeps the encoder under `vit.`; the pooler and classifier are unused.
  tensors = Renamed([(open_weights(path), lambda k: k[len("vit."):] if k.startswith("vit.") else k)])
  return load_module(lambda: ViTModel(cfg, rngs=nnx.Rngs(0)), tensors, vit_rules(cfg), source=path,
                     ignore=(r"^pooler\.", r"^classifier\."))


# --- LPIPS ---------------------------------------------------------------------------------------

# lpips' heads are 1x1 convs without bias, [1, C, 1, 1]; ours are per-channel weights [C].
HEAD = Transform("lpips_head", lambda x: x.reshape(-1), lambda x: x.reshape(1, -1, 1, 1), ndim=4)


def lpips_rules(cfg: LPIPSConfig) -> list[Rule]:
  rules = []
  for op in NETS[cfg.net]:
    if op[0] == "conv":
      rules += [Rule(f"features.{op[1]}.weight", f"features.conv{op[1]}.kernel", CONV),
                Rule(f"features.{op[1]}.bias", f"features.conv{op[1]}.bias")]
  rules += [Rule(f"lin{k}.model.1.weight", f"lins.{k}", HEAD) for k in range(len(cfg.channels))]
  return rules


def lpips_from_files(backbone: str, heads: str, net: str = "alex", dtype=None) -> LPIPS:
  """LPIPS from torchvision's backbone weights (e.g. alexnet-owt-7be5be79.pth, vgg16-397923af.pth,
  or a safetensors copy) and the lpips package's heads (weights/v0.1/alex.pth or vgg.pth)."""
  cfg = LPIPSConfig(net=net, **({} if dtype is None else {"dtype": str(dtype), "param_dtype": str(dtype)}))
  tensors = Renamed([(open_weights(backbone), lambda k: k if k.startswith("features.") else None),
                      (open_weights(heads), lambda k: k if re.match(r"^lin\d+\.model\.1\.weight$", k) else None)])
  return load_module(lambda: LPIPS(cfg, rngs=nnx.Rngs(0)), tensors, lpips_rules(cfg),
                     source=f"{backbone} + {heads}")


def clip_text_from_pretrained(path: str, dtype=None, **runtime):
  """A CLIPTextModel folder (e.g. an InstructPix2Pix pipeline's text_encoder/) -> ClipTextModel."""
  hf = read_config(path)
  check_arch(path, hf, ("CLIPTextModel", "CLIPTextModelWithProjection"))
  cfg = ClipTextConfig.from_hf(hf, **runtime_kwargs(dtype, runtime))
  return load_module(lambda: ClipTextModel(cfg, rngs=nnx.Rngs(0)), open_weights(path),
                     prefixed(clip_text_rules(), "text_model.", ""), source=path,
                     ignore=IGNORED + (r"^text_projection\.",))
