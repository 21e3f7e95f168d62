"""The full MGIE from local pretrained folders named by a config (`config.pretrained`): LLaVA (v1
or llava-hf) + CLIP, the SD (or InstructPix2Pix) UNet and VAE, optionally MGIE's released
`mllm.pt` / `unet.pt`; the vocabulary grown by the MGIE tokens, the UNet widened to 8 channels."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.models import AutoencoderKL, LlavaForConditionalGeneration, UNet2DConditionModel
from mgie_jax.models.edit_head import EditHead, EditHeadConfig
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import LlamaTokenizer


def resize_vocab(llava: LlavaForConditionalGeneration, vocab: int, key) -> LlavaForConditionalGeneration:
  """Grow embed_tokens and lm_head to `vocab` rows; new rows (the [IMG] tokens) ~ N(0, 0.02)."""
  lm = llava.language_model
  old = lm.config.vocab_size
  if vocab == old:
    return llava
  if vocab < old:
    raise ValueError(f"tokenizer has {vocab} tokens, fewer than the checkpoint's {old}")
  k1, k2 = jax.random.split(key)
  grow = lambda w, k, axis: jnp.concatenate(
      [w, 0.02 * jax.random.normal(k, w.shape[:axis] + (vocab - old,) + w.shape[axis + 1:], w.dtype)], axis)
  emb = grow(lm.model.embed_tokens.embedding[...], k1, 0)
  text = dataclasses.replace(lm.config, vocab_size=vocab)
  cfg = dataclasses.replace(llava.config, text=text)
  new = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
  state = dict(nnx.to_flat_state(nnx.state(llava)))
  state[("language_model", "model", "embed_tokens", "embedding")] = \
      state[("language_model", "model", "embed_tokens", "embedding")].replace(emb)
  if not text.tie_word_embeddings:
    head = ("language_model", "lm_head", "kernel")
    state[head] = state[head].replace(grow(lm.lm_head.kernel[...], k2, 1))
  graphdef, _ = nnx.split(new)
  return nnx.merge(graphdef, nnx.from_flat_state(list(state.items())))


def load_vae(path: str, rt: dict) -> AutoencoderKL:
  return AutoencoderKL.from_pretrained(path, **rt)


def sd_noise_schedule(sd: str) -> NoiseSchedule | None:
  """The training schedule in an SD/InstructPix2Pix folder's scheduler/scheduler_config.json."""
  path = os.path.join(sd, "scheduler", "scheduler_config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return NoiseSchedule.from_diffusers(json.load(f))


def load_pretrained(c, tok: LlamaTokenizer) -> MGIE:
  """The full MGIE from local folders (config.pretrained), on the host, ready to be sharded."""
  from mgie_jax.build import noise_schedule, runtime
  from mgie_jax.convert.diffusion import unet_from_state_dict
  from mgie_jax.convert.mgie import edit_head_from_state_dict
  p, rt = c.pretrained, runtime(c)
  if not p.llava or not p.sd:
    raise ValueError("config.pretrained.llava and config.pretrained.sd must name local folders")
  llava = LlavaForConditionalGeneration.from_pretrained(
      p.llava, vision_tower=p.vision_tower or None, remat=c.model.remat,
      attention_impl=c.model.attention_impl, **rt)
  llava = resize_vocab(llava, len(tok), jax.random.key(c.seed))
  head_cfg = EditHeadConfig(**dict(c.model.edit_head), **rt)
  if p.mllm_pt:
    from mgie_jax.convert.checkpoint import open_weights
    tensors = open_weights(p.mllm_pt)
    head = edit_head_from_state_dict(tensors, head_cfg)
    lm = llava.language_model
    lm.model.embed_tokens.embedding[...] = jnp.asarray(np.asarray(tensors["model.embed_tokens.weight"], np.float32))
    lm.lm_head.kernel[...] = jnp.asarray(np.asarray(tensors["lm_head.weight"], np.float32).T)
  else:
    head = EditHead(head_cfg, rngs=nnx.Rngs(c.seed))
  if p.unet_pt:
    unet = unet_from_state_dict(p.unet_pt, os.path.join(p.sd, "unet"), attention_impl=c.model.attention_impl,
                                remat=c.model.remat != "none", **rt)
  else:
    unet = UNet2DConditionModel.from_pretrained(p.sd, in_channels=8, attention_impl=c.model.attention_impl,
                                                remat=c.model.remat != "none", **rt)
  vae = load_vae(p.get("vae") or p.sd, rt)
  cfg = MGIEConfig(llava=llava.config, edit_head=head_cfg, unet=unet.config, vae=vae.config,
                   img_token_id=tok.token_to_id("[IMG0]"), ins_loss_weight=c.train.ins_loss_weight,
                   edit_loss_weight=c.train.edit_loss_weight, noise=noise_schedule(c))
  return MGIE.from_parts(cfg, llava, head, unet, vae)
