"""MGIE: LLaVA writes the expressive instruction and 8 visual tokens, the edit head turns their
hidden states into a condition, an InstructPix2Pix UNet edits. Trained jointly:

  L = L_ins (token cross-entropy over the targets) + 0.5 * L_edit (epsilon MSE)

The training forward follows the official release (docs/design.md, "The model"): the [IMG] window starts
one token before [IMG0]; the null condition is edit_head(zeros, e) with gradients; target latents
are a VAE posterior sample x scaling, input latents the posterior mean, unscaled; CFG dropout
drops the text for p < 2u and the image for u <= p < 3u (u = 0.05).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mgie_jax.diffusion.schedule import DDPMSchedule, NoiseSchedule
from mgie_jax.models.edit_head import EditHead, EditHeadConfig
from mgie_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration, select_vision_features
from mgie_jax.models.lora import LoraConfig, add_adapters
from mgie_jax.models.unet import UNet2DConditionModel, UNetConfig
from mgie_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from mgie_jax.text.template import IGNORE_INDEX, NUM_IMG_TOKENS, img_window_start


@dataclasses.dataclass(frozen=True)
class MGIEConfig:
  llava: LlavaConfig
  edit_head: EditHeadConfig
  unet: UNetConfig
  vae: VAEConfig
  img_token_id: int                  # id of [IMG0]; [IMG0..7] are contiguous
  ins_loss_weight: float = 1.0
  edit_loss_weight: float = 0.5
  uncond_prob: float = 0.05          # CFG dropout unit u
  noise: NoiseSchedule = NoiseSchedule()
  min_snr_gamma: float = 0.0         # > 0: Min-SNR-gamma loss weights (Hang et al. 2023); the release: 0
  lora: LoraConfig = LoraConfig()    # adapters on chosen Linear layers (models/lora.py); rank 0: none
  template: str = "llava_v1"         # the prompt (text/template.py): "llava_v1" or "llava_1_5"

  @property
  def num_train_timesteps(self) -> int:
    return self.noise.num_train_timesteps

  @property
  def clip_size(self) -> int:
    """The side of the CLIP view of the input the MLLM reads."""
    return self.llava.vision.image_size

  @property
  def num_image_tokens(self) -> int:
    return self.llava.num_image_tokens

  @property
  def sees_image(self) -> bool:
    """False for LGIE (template "text_only"): the language model reads the instruction alone."""
    return self.template != "text_only"

  @property
  def prompt_image_tokens(self) -> int:
    """Image tokens in the language model's prompt (0 for LGIE)."""
    return self.num_image_tokens if self.sees_image else 0

  def denominators(self, batch):
    """(target tokens, rows with an [IMG] window) of a whole batch: L_ins and L_edit divide by them."""
    return target_tokens(batch["labels"]), jnp.sum(has_img_window(batch["input_ids"], self.img_token_id))

  def schedule(self) -> DDPMSchedule:
    return self.noise.ddpm()


class Draws(NamedTuple):
  """Every random number one training step uses, drawn up front (so a reference can reuse them)."""
  p: jax.Array                # [B] uniform: CFG dropout
  t: jax.Array                # [B] int timesteps
  noise: jax.Array            # [B, h, w, c] diffusion noise
  posterior: jax.Array        # [B, h, w, c] N(0, 1) for the VAE posterior sample


def sample_draws(key, batch: int, latent_shape, num_train_timesteps: int = 1000) -> Draws:
  k = jax.random.split(key, 4)
  shape = (batch,) + tuple(latent_shape)
  return Draws(jax.random.uniform(k[0], (batch,)),
               jax.random.randint(k[1], (batch,), 0, num_train_timesteps),
               jax.random.normal(k[2], shape), jax.random.normal(k[3], shape))


def target_tokens(labels):
  """Number of next-token targets in `labels` (the denominator of L_ins)."""
  return jnp.sum(labels[:, 1:] != IGNORE_INDEX)


def token_cross_entropy(logits, labels, denominator=None):
  """Next-token CE summed over the target tokens (labels != IGNORE_INDEX) / `denominator`
  (default: this batch's target count, i.e. the mean; a micro-batch passes the whole batch's)."""
  logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
  mask = labels != IGNORE_INDEX
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, labels, 0))
  if denominator is None:
    denominator = jnp.sum(mask)
  return jnp.sum(ce * mask) / jnp.maximum(denominator, 1)


def gather_img_window(hidden, start):
  """hidden [B, L, D], start [B] -> [B, 8, D]: the [IMG] window's rows start .. start+7."""
  idx = start[:, None] + jnp.arange(NUM_IMG_TOKENS)[None]
  return jnp.take_along_axis(hidden, idx[..., None], axis=1)


def has_img_window(input_ids, img0_id: int):
  """[B] bool: the row holds [IMG0] (rows without it have no [IMG] window to read)."""
  return jnp.any(input_ids == img0_id, axis=1)


# What the frozen towers give the training loss, as the frozen-feature cache stores it
# (data_pipelines/features.py): the VAE posteriors (unscaled; the target's sample is drawn at
# training time from the step's own noise) and the CLIP features the projector reads.
FEATURES = ("edited_latent_mean", "edited_latent_logvar", "input_latent_mean", "clip_features")


def frozen_features(vae, vision_tower, llava_cfg: LlavaConfig, input_image, edited_image, clip_image) -> dict:
  """The FEATURES of a batch of images, computed exactly as the training loss computes them."""
  target, source = vae.encode(edited_image), vae.encode(input_image)
  return {"edited_latent_mean": target.mean, "edited_latent_logvar": target.logvar,
          "input_latent_mean": source.mean,
          "clip_features": select_vision_features(vision_tower, llava_cfg, clip_image)}


def feature_shapes(cfg: "MGIEConfig", resolution: int) -> dict:
  """name -> shape of one example's FEATURES."""
  h = resolution // 2 ** (len(cfg.vae.block_out_channels) - 1)
  latent = (h, h, cfg.vae.latent_channels)
  return {"edited_latent_mean": latent, "edited_latent_logvar": latent, "input_latent_mean": latent,
          "clip_features": (cfg.num_image_tokens, cfg.llava.vision.hidden_size)}


def diffusion_loss(unet, vae, cfg, batch: dict, draws: Draws, cond, null, rows_ok, rows):
  """InstructPix2Pix's epsilon (or v) MSE as MGIE trains it, summed over `rows_ok` rows / `rows`.

  Target latents: a posterior sample x scaling of the edited image; input latents: the posterior
  mean, unscaled; CFG dropout drops the text for p < 2u and the image for u <= p < 3u."""
  frozen_vae = jax.lax.stop_gradient
  if FEATURES[0] in batch:       # read from the frozen-feature cache: the same posterior, no encoder
    dt = vae.config.dtype            # the cache holds the encoder's outputs, perhaps widened to fp32
    target_post = DiagonalGaussian(batch["edited_latent_mean"].astype(dt), batch["edited_latent_logvar"].astype(dt))
    source_mean = batch["input_latent_mean"].astype(dt)
  else:
    with jax.named_scope("vae"):
      target_post = vae.encode(batch["edited_image"])
      source_mean = vae.encode(batch["input_image"]).mean
  latents = frozen_vae(target_post.mean + target_post.std * draws.posterior) * vae.config.scaling_factor
  image_latents = frozen_vae(source_mean)
  schedule = cfg.noise.ddpm()
  noisy = schedule.add_noise(latents, draws.noise, draws.t)
  u = cfg.uncond_prob
  drop_text = (draws.p < 2 * u)[:, None, None]
  drop_image = ((draws.p >= u) & (draws.p < 3 * u))[:, None, None, None]
  cond = jnp.where(drop_text, null, cond)
  image_latents = jnp.where(drop_image, 0.0, image_latents)
  with jax.named_scope("unet"):
    pred = unet(jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=-1), draws.t, cond)
  target = schedule.target(latents, draws.noise, draws.t)
  per_row = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
  gamma = getattr(cfg, "min_snr_gamma", 0.0)
  if gamma:    # Min-SNR-gamma: less weight on the nearly clean timesteps, where there is little to learn
    acp = schedule.alphas_cumprod[draws.t]
    snr = acp / (1.0 - acp)
    per_row = per_row * jnp.minimum(snr, gamma) / (snr + 1.0 if cfg.noise.prediction_type == "v_prediction" else snr)
  return jnp.sum(jnp.where(rows_ok, per_row, 0.0)) / jnp.maximum(rows, 1)


class MGIE(nnx.Module):

  def __init__(self, cfg: MGIEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.mllm = LlavaForConditionalGeneration(cfg.llava, rngs=rngs)
    self.edit_head = EditHead(cfg.edit_head, rngs=rngs)
    self.unet = UNet2DConditionModel(cfg.unet, rngs=rngs)
    self.vae = AutoencoderKL(cfg.vae, rngs=rngs)
    if cfg.lora.rank:      # after every tower is built: the towers' own initialisation is unchanged
      add_adapters(self, cfg.lora, rngs.params())

  @classmethod
  def from_parts(cls, cfg: MGIEConfig, mllm, edit_head, unet, vae) -> "MGIE":
    """Assemble from loaded parts (no initialisation of anything)."""
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    model.mllm, model.edit_head, model.unet, model.vae = mllm, edit_head, unet, vae
    return model

  def img_embeddings(self):
    """e: the input embeddings of [IMG0..7], [8, D] (trained with the embedding table)."""
    table = self.mllm.language_model.model.embed_tokens.embedding[...]
    return jax.lax.dynamic_slice_in_dim(table, self.config.img_token_id, NUM_IMG_TOKENS, axis=0)

  def conditions(self, hidden, input_ids):
    """(U, null): edit-head conditions from the [IMG] window of `hidden` and the null condition."""
    start = img_window_start(input_ids, self.config.img_token_id)
    h = gather_img_window(hidden, jnp.maximum(start, 0))
    e = self.img_embeddings().astype(h.dtype)
    with jax.named_scope("edit_head"):
      return self.edit_head(h, e), self.edit_head(jnp.zeros_like(h), e)

  def losses(self, batch: dict, draws: Draws, ins_tokens=None, edit_rows=None) -> dict:
    """The joint training loss of one batch; returns loss, ins (L_ins), edit (L_edit) and
    no_img (rows without [IMG0]: left out of L_edit, which has no window to read there).

    L_ins is a mean over target tokens and L_edit over examples; a micro-batch of a larger batch
    passes that batch's `ins_tokens` / `edit_rows` so that micro-batch losses sum to the batch's.
    """
    cfg = self.config
    if not cfg.sees_image:            # LGIE: no image reaches the language model
      out = self.mllm(batch["input_ids"], attention_mask=batch["attention_mask"])
    elif "clip_features" in batch:      # the frozen-feature cache: the projector reads them directly
      feats = self.mllm.image_features(vision_features=batch["clip_features"].astype(cfg.llava.vision.dtype))
      out = self.mllm(batch["input_ids"], image_features=feats, attention_mask=batch["attention_mask"])
    else:
      out = self.mllm(batch["input_ids"], batch["clip_image"], attention_mask=batch["attention_mask"])
    l_ins = token_cross_entropy(out.logits, batch["labels"], ins_tokens)
    ok = has_img_window(batch["input_ids"], cfg.img_token_id)
    if edit_rows is None:
      edit_rows = jnp.sum(ok)
    cond, null = self.conditions(out.hidden_states, batch["input_ids"])
    l_edit = diffusion_loss(self.unet, self.vae, cfg, batch, draws, cond, null, ok, edit_rows)
    loss = cfg.ins_loss_weight * l_ins + cfg.edit_loss_weight * l_edit
    return {"loss": loss, "ins": l_ins, "edit": l_edit, "no_img": jnp.sum(~ok)}
