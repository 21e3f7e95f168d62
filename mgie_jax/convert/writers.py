"""A trained MGIE as PyTorch-side files, one tensor at a time, with the same tables as import.

  mgie       mllm.pt (embed_tokens, lm_head, edit_head.*, emb) and unet.pt, as the official demo
             loads them on top of stock LLaVA-7B and InstructPix2Pix (torch.save, fp16 default)
  llava-v1   a LLaVA v1 folder (flat LLaMA config + mm_* fields, safetensors shards + index,
             tokenizer files with the added tokens' ids), CLIP beside it in clip/
  llava-hf   a transformers LlavaForConditionalGeneration folder (a v1 single-Linear projector
             written exactly: identity activation, identity second Linear) with processor files
  diffusers  an InstructPix2Pix pipeline folder (unet/, vae/, scheduler/, model_index.json)
  peft       a LoRA run's adapters alone (convert/adapters.py); every other format holds them merged

Writers read parameters from a `source` (mgie_jax.run.workdir.TrainedSource for a run on disk):
`get(path)` one parameter in our layout (numpy), `layers(path, n)` its per-layer slices, `shape(path)`,
`release()` to drop what it cached, and `model_config`, `abstract` (the model's structure), `tok`,
`sd_folder` (the pretrained SD folder, or ""). Only one module's tensors are held at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from mgie_jax.convert.adapters import write_peft
from mgie_jax.convert.diffusion import derived_rules
from mgie_jax.convert.mapping import Rule, prefixed
from mgie_jax.convert.mllm import V1_TOWER, clip_vision_rules, llava_rules
from mgie_jax.convert.release import edit_head_rules
from mgie_jax.convert.save import DIFFUSERS_VERSION, save_diffusers, save_sharded, unet_config, vae_config
from mgie_jax.text import IMG_TOKENS, MGIE_TOKENS, LlamaTokenizer

FORMATS = ("mgie", "llava-v1", "llava-hf", "diffusers", "peft")


def tensors(source, rules: list[Rule], dtype, prefix: str = ""):
  """(torch key, array) for each rule: our parameter `prefix + rule.ours` -> the torch layout."""
  for rule in rules:
    if rule.stacked:
      n = source.shape(prefix + rule.ours)[0]
      for i, arr in enumerate(source.layers(prefix + rule.ours, n)):
        yield rule.torch.replace("{i}", str(i)), _cast(rule.transform.to_torch(arr), dtype)
    else:
      yield rule.torch, _cast(rule.transform.to_torch(source.get(prefix + rule.ours)), dtype)


def _cast(x, dtype):
  return np.ascontiguousarray(np.asarray(x).astype(dtype) if dtype is not None else np.asarray(x))


# --- mgie: mllm.pt + unet.pt ----------------------------------------------------------------------

def write_mgie(source, out: str, dtype="float16") -> list[str]:
  """The official demo's two files. mllm.pt: model.embed_tokens.weight and lm_head.weight (every
  row: all are trained), edit_head.* under the official module names, emb = the input embeddings
  of [IMG0..7] as [1, 8, D]; unet.pt: the 8-channel UNet's diffusers state dict, no prefix."""
  import torch
  cfg = source.model_config
  to_torch = lambda d: {k: torch.from_numpy(v) for k, v in d.items()}
  embed = source.get("mllm.language_model.model.embed_tokens.embedding").astype(dtype)
  mllm = {"model.embed_tokens.weight": embed}
  if not cfg.llava.text.tie_word_embeddings:
    mllm["lm_head.weight"] = np.ascontiguousarray(source.get("mllm.language_model.lm_head.kernel").T.astype(dtype))
  mllm.update(tensors(source, prefixed(edit_head_rules(cfg.edit_head), "edit_head.", ""), dtype, "edit_head."))
  mllm["emb"] = np.ascontiguousarray(embed[cfg.img_token_id:cfg.img_token_id + len(IMG_TOKENS)][None])
  os.makedirs(out, exist_ok=True)
  torch.save(to_torch(mllm), os.path.join(out, "mllm.pt"))
  with open(os.path.join(out, "edit_head.json"), "w") as f:    # what the shapes do not tell (heads, eps)
    json.dump({**dataclasses.asdict(cfg.edit_head), "template": cfg.template}, f, indent=1)
  del mllm, embed
  source.release()
  unet_rules = derived_rules(source.abstract.unet)
  torch.save(to_torch(dict(tensors(source, unet_rules, dtype, "unet."))), os.path.join(out, "unet.pt"))
  source.release()
  return ["mllm.pt", "unet.pt", "edit_head.json"]


# --- LLaVA folders --------------------------------------------------------------------------------

def _llama_hf_config(text, tok: LlamaTokenizer) -> dict:
  return {"vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
          "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
          "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
          "head_dim": text.head_dim, "rms_norm_eps": text.rms_norm_eps, "rope_theta": text.rope_theta,
          "max_position_embeddings": text.max_position_embeddings, "hidden_act": text.hidden_act,
          "tie_word_embeddings": text.tie_word_embeddings, "attention_bias": text.attention_bias,
          "mlp_bias": text.mlp_bias, "initializer_range": text.initializer_range, "use_cache": True,
          "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": None}


def _clip_hf_config(v) -> dict:
  return {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
          "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
          "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "projection_dim": 768,
          "model_type": "clip_vision_model"}


def write_tokenizer(tok: LlamaTokenizer, out: str) -> None:
  """tokenizer.model byte-identical; added tokens (<im_patch> <im_start> <im_end> [IMG0..7]) with
  their ids, special, whitespace stripped on both sides as the slow tokenizer the release used
  does; no tokenizer.json (a stale fast one would disagree: it is rebuilt from these files)."""
  os.makedirs(out, exist_ok=True)
  shutil.copyfile(tok.model_file, os.path.join(out, "tokenizer.model"))
  added = dict(sorted(tok.added.items(), key=lambda kv: kv[1]))   # MGIE's, and a LLaVA-1.5 folder's <image>, <pad>
  with open(os.path.join(out, "added_tokens.json"), "w") as f:
    json.dump(added, f, indent=1)
  piece = tok.sp.id_to_piece
  decoder = {str(i): {"content": piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i in (tok.sp.unk_id(), tok.bos_id, tok.eos_id)}
  decoder.update({str(i): {"content": t, "lstrip": True, "normalized": False, "rstrip": True, "single_word": False,
                           "special": True} for t, i in added.items()})
  config = {"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048, "padding_side": "right",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
            "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(tok.sp.unk_id()),
            "pad_token": None, "added_tokens_decoder": decoder}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(tok.sp.unk_id()),
               "additional_special_tokens": list(added)}, f, indent=1)


def write_clip(source, out: str, dtype) -> str:
  """The vision tower as a transformers CLIPVisionModel folder."""
  cfg = source.model_config.llava.vision
  os.makedirs(out, exist_ok=True)
  rules = prefixed(clip_vision_rules(), "vision_model.", "")
  save_sharded(dict(tensors(source, rules, dtype, "mllm.vision_tower.")), out)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"architectures": ["CLIPVisionModel"], **_clip_hf_config(cfg)}, f, indent=1)
  return out


def write_llava_v1(source, out: str, dtype="float16", max_shard_bytes: int = 5 << 30,
                   final: str | None = None) -> list[str]:
  """LLaVA v1 as MGIE and the official code load it. A v1 folder holds no CLIP weights: the vision
  tower goes to its clip/ subfolder, which config.json's mm_vision_tower names (by the folder's
  `final` path, where it will live)."""
  cfg = source.model_config.llava
  v1 = dataclasses.replace(cfg, layout="v1")
  rules = [r for r in llava_rules(v1) if not r.torch.startswith(V1_TOWER)]
  os.makedirs(out, exist_ok=True)
  files = save_sharded(dict(tensors(source, rules, dtype, "mllm.")), out, max_shard_bytes=max_shard_bytes)
  source.release()
  write_clip(source, os.path.join(out, "clip"), dtype)
  clip = os.path.join(os.path.abspath(final or out), "clip")
  hf = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **_llama_hf_config(cfg.text, source.tok),
        "mm_vision_tower": clip, "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer, "mm_use_im_start_end": True, "use_mm_proj": True,
        "mm_projector_type": cfg.projector, "im_patch_token": cfg.image_token_id,
        "torch_dtype": str(np.dtype(dtype).name) if dtype else "float32"}
  # LLaVA v1's own config quirks, kept as they are (docs/design.md, "Export").
  hf.update(bos_token_id=0, eos_token_id=1, pad_token_id=-1)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  write_tokenizer(source.tok, out)
  return files


def write_llava_hf(source, out: str, dtype="float16", max_shard_bytes: int = 5 << 30) -> list[str]:
  """transformers' LlavaForConditionalGeneration. Its projector has two Linears: a v1 single
  Linear is written exactly as Linear -> identity activation ("linear") -> identity Linear."""
  cfg = source.model_config.llava
  hf_cfg = dataclasses.replace(cfg, layout="hf", projector="mlp2x_gelu")
  rules = [r for r in llava_rules(hf_cfg) if cfg.projector != "linear" or "linear_2" not in r.torch]
  out_tensors = dict(tensors(source, rules, dtype, "mllm."))
  if cfg.projector == "linear":
    d = cfg.text.hidden_size
    out_tensors["model.multi_modal_projector.linear_2.weight"] = np.eye(d, dtype=dtype)
    out_tensors["model.multi_modal_projector.linear_2.bias"] = np.zeros((d,), dtype)
  os.makedirs(out, exist_ok=True)
  files = save_sharded(out_tensors, out, max_shard_bytes=max_shard_bytes)
  del out_tensors
  source.release()
  text = _llama_hf_config(cfg.text, source.tok)
  hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": {"model_type": "llama", **text}, "vision_config": _clip_hf_config(cfg.vision),
        "image_token_id": cfg.image_token_id, "image_token_index": cfg.image_token_id,
        "projector_hidden_act": "linear" if cfg.projector == "linear" else cfg.projector_act,
        "multimodal_projector_bias": cfg.projector_bias, "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.num_image_tokens, "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "torch_dtype": str(np.dtype(dtype).name) if dtype else "float32"}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  write_tokenizer(source.tok, out)
  size = cfg.vision.image_size
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
               "do_convert_rgb": True}, f, indent=1)
  return files


# --- diffusers -----------------------------------------------------------------------------------

def write_diffusers(source, out: str, dtype="float16") -> list[str]:
  """An InstructPix2Pix pipeline folder: the trained UNet, the VAE, the scheduler on the model's
  noise schedule; text_encoder/ and tokenizer/ copied from the pretrained SD folder when it has
  them (else load the pipeline with text_encoder=None, tokenizer=None and pass prompt_embeds)."""
  cfg = source.model_config
  abstract = source.abstract
  save_diffusers(dict(tensors(source, derived_rules(abstract.unet), dtype, "unet.")), unet_config(cfg.unet),
                 os.path.join(out, "unet"))
  source.release()
  save_diffusers(dict(tensors(source, derived_rules(abstract.vae), dtype, "vae.")), vae_config(cfg.vae),
                 os.path.join(out, "vae"))
  noise = cfg.noise
  scheduler = {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
               "num_train_timesteps": noise.num_train_timesteps, "beta_start": noise.beta_start,
               "beta_end": noise.beta_end, "beta_schedule": noise.beta_schedule,
               "prediction_type": noise.prediction_type, "timestep_spacing": "linspace", "steps_offset": 0,
               "rescale_betas_zero_snr": bool(noise.rescale_betas_zero_snr)}
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(scheduler, f, indent=1)
  index = {"_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": DIFFUSERS_VERSION,
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"], "text_encoder": [None, None],
           "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
           "image_encoder": [None, None], "requires_safety_checker": False}
  sd = source.sd_folder
  for name, cls in (("text_encoder", ["transformers", "CLIPTextModel"]), ("tokenizer", ["transformers", "CLIPTokenizer"])):
    if sd and os.path.isdir(os.path.join(sd, name)):
      shutil.copytree(os.path.join(sd, name), os.path.join(out, name), dirs_exist_ok=True)
      index[name] = cls
  with open(os.path.join(out, "model_index.json"), "w") as f:
    json.dump(index, f, indent=1)
  return ["unet", "vae", "scheduler", "model_index.json"]


WRITERS = {"mgie": write_mgie, "llava-v1": write_llava_v1, "llava-hf": write_llava_hf, "diffusers": write_diffusers,
           "peft": write_peft}
