"""LLaVA: CLIP vision tower + projector + LLaMA, image features spliced in place of image tokens.

Two layouts share this class:
  * "v1"  LLaVA v1 as MGIE uses it: one Linear projector, `<im_start><im_patch>x256<im_end>`
          in the prompt, the `<im_patch>` embeddings replaced by image features;
  * "hf"  transformers' `llava-hf` LLaVA-1.5: 2-layer GELU MLP projector, `<image>` expanded to
          one token per image feature by the processor, replaced the same way.
Either way: features = projector(CLIP hidden_states[vision_feature_layer], CLS dropped).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.models import layers
from mgie_jax.models.clip import ClipVisionConfig, ClipVisionModel
from mgie_jax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaOutput

PROJECTORS = ("linear", "mlp2x_gelu")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: ClipVisionConfig
  text: LlamaConfig
  projector: str = "linear"
  projector_act: str = "gelu"
  projector_bias: bool = True
  vision_feature_layer: int = -2
  vision_feature_select_strategy: str = "default"   # "default" drops CLS, "full" keeps it
  image_token_id: int = 32000
  layout: str = "v1"

  def __post_init__(self):
    if self.projector not in PROJECTORS:
      raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}")

  @property
  def num_image_tokens(self) -> int:
    n = self.vision.num_patches
    return n if self.vision_feature_select_strategy == "default" else n + 1


class Projector(nnx.Module):
  """LLaVA v1: one Linear. LLaVA-1.5: Linear -> GELU -> Linear."""

  def __init__(self, cfg: LlavaConfig, rngs: nnx.Rngs):
    v, d = cfg.vision.hidden_size, cfg.text.hidden_size
    kw = dict(dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype, rngs=rngs, use_bias=cfg.projector_bias)
    # Column- then row-parallel, like an MLP; a v1 single Linear is column-parallel.
    self.linear_1 = layers.linear(v, d, ("vision_embed", "mlp"), **kw)
    self.two_layer = cfg.projector == "mlp2x_gelu"
    if self.two_layer:
      self.linear_2 = layers.linear(d, d, ("mlp", "embed"), **kw)
      self.act = layers.activation(cfg.projector_act)

  def __call__(self, x):
    x = self.linear_1(x)
    return self.linear_2(self.act(x)) if self.two_layer else x


def splice_image_features(embeds, input_ids, features, image_token_id: int):
  """Replace, row by row and in order, the embeddings of image tokens by image features.

  Each row must hold exactly features.shape[1] image tokens (checked on the host by
  mgie_jax.text; inside jit we cannot raise).
  """
  is_img = input_ids == image_token_id
  idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(features.astype(embeds.dtype), idx[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered, embeds)


def select_vision_features(vision_tower, cfg: LlavaConfig, pixel_values):
  """What the projector reads: CLIP's hidden_states[vision_feature_layer], CLS dropped by the
  "default" strategy; [B, num_image_tokens, vision hidden]. A function of the tower alone, so
  that the frozen-feature cache runs it without the language model."""
  with jax.named_scope("clip"):          # scopes name each tower's ops in profiles and HLO
    out = vision_tower(pixel_values, output_hidden_states=True)
  feats = out.hidden_states[cfg.vision_feature_layer]
  return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


class LlavaForConditionalGeneration(nnx.Module):

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.vision_tower = ClipVisionModel(cfg.vision, rngs=rngs)
    self.multi_modal_projector = Projector(cfg, rngs)
    self.language_model = LlamaForCausalLM(cfg.text, rngs=rngs)

  def image_features(self, pixel_values=None, vision_features=None):
    """[B, 224, 224, 3] CLIP-normalised NHWC (or the CLIP features the projector reads, e.g.
    from a frozen-feature cache) -> [B, num_image_tokens, text hidden]."""
    if vision_features is None:
      vision_features = select_vision_features(self.vision_tower, self.config, pixel_values)
    with jax.named_scope("projector"):
      return self.multi_modal_projector(vision_features)

  def embed(self, input_ids, pixel_values=None, image_features=None):
    # The image token id may lie outside the embedding table: look up 0 there instead. A
    # generated image token (no features given) keeps its own embedding, as in transformers.
    vocab = self.config.text.vocab_size
    embeds = self.language_model.embed(jnp.where(input_ids < vocab, input_ids, 0))
    if pixel_values is not None:
      image_features = self.image_features(pixel_values)
    if image_features is not None:
      embeds = splice_image_features(embeds, input_ids, image_features, self.config.image_token_id)
    return embeds

  def __call__(self, input_ids, pixel_values=None, *, image_features=None, attention_mask=None,
               positions=None, cache=None) -> LlamaOutput:
    embeds = self.embed(input_ids, pixel_values, image_features)
    return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                               positions=positions, cache=cache)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
    return self.language_model.init_cache(batch, max_length, dtype)
