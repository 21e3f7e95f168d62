"""Building MGIE from an ml_collections config: random init (tiny) or local pretrained folders."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.models import (AutoencoderKL, ClipVisionConfig, LlamaConfig, LlavaConfig,
                             LlavaForConditionalGeneration, UNet2DConditionModel, UNetConfig, VAEConfig)
from mgie_jax.models.edit_head import EditHead, EditHeadConfig
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import LlamaTokenizer


def runtime(c) -> dict:
  return dict(dtype=c.model.dtype, param_dtype="float32")


def random_config(c, tok: LlamaTokenizer) -> MGIEConfig:
  """MGIEConfig for a randomly initialised model whose vocabulary is the tokenizer's."""
  m, rt = c.model, runtime(c)
  llava = LlavaConfig(
      vision=ClipVisionConfig(**dict(m.vision), **rt, remat=m.remat, attention_impl=m.attention_impl),
      text=LlamaConfig(vocab_size=len(tok), **dict(m.text), **rt, remat=m.remat,
                       attention_impl=m.attention_impl, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id),
      projector=m.projector, image_token_id=tok.token_to_id("<im_patch>"), layout="v1")
  return MGIEConfig(
      llava=llava, edit_head=EditHeadConfig(**dict(m.edit_head), **rt),
      unet=UNetConfig(in_channels=8, **dict(m.unet), **rt, attention_impl=m.attention_impl),
      vae=VAEConfig(**dict(m.vae), **rt), img_token_id=tok.token_to_id("[IMG0]"),
      ins_loss_weight=c.train.ins_loss_weight, edit_loss_weight=c.train.edit_loss_weight)


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


def load_pretrained(c, tok: LlamaTokenizer) -> MGIE:
  """The full MGIE from local folders (config.pretrained), on the host, ready to be sharded."""
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
  vae = AutoencoderKL.from_pretrained(p.sd, **rt)
  cfg = MGIEConfig(llava=llava.config, edit_head=head_cfg, unet=unet.config, vae=vae.config,
                   img_token_id=tok.token_to_id("[IMG0]"), ins_loss_weight=c.train.ins_loss_weight,
                   edit_loss_weight=c.train.edit_loss_weight)
  return MGIE.from_parts(cfg, llava, head, unet, vae)
