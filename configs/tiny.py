"""Tiny MGIE on the built-in synthetic edit dataset: random init, learns its edits on 2 CPU cores
in a few minutes.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny

On the first run, <workdir>/data receives the synthetic dataset (plain and grounded edits), its
tokenizer, and a small VAE trained on its images (saved as a diffusers folder and then loaded
frozen, exactly as SD's VAE is in the full recipe). Training ends with a validation summary:
the edits' L1 on the test split against copying the input.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mgie_jax.parallel import DEFAULT_RULES


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = dict(
      kind="mgie",                        # "mgie", or "ip2p": the text-only baseline (configs/tiny_ip2p.py)
      init="random",                      # "random" or "pretrained" (see configs/ipr2pr.py)
      dtype="float32",                    # compute dtype of every tower
      frozen_dtype="float32",             # storage dtype of the frozen towers
      remat="none",
      attention_impl="xla",
      vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=7),
      text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512),
      projector="linear",
      # Learned queries start small (the release: N(0, 1)) so that, from random weights, the
      # condition follows the [IMG] states from the first steps.
      edit_head=dict(llm_dim=64, width=32, heads=4, ffn=64, encoder_layers=1, decoder_layers=1,
                     num_queries=77, out_dim=32, query_std=0.02),
      # Attention at the 8x8 level only: half the step time of attention at 16x16 on CPU.
      unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                cross_attention_dim=32, norm_num_groups=8),
      # The VAE trained on the synthetic images (pretrained.vae = "synthetic"); frozen in training.
      vae=dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               mid_block_add_attention=False),
      text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32),   # used by kind="ip2p" only
      # The DDPM training schedule (SD's betas); inference samples on the same one. v-prediction:
      # from scratch, epsilon-prediction learns to use the input image far too slowly at high noise.
      # Zero terminal SNR: with SD's betas the noisiest step still shows the target, which a model
      # trained from scratch learns to read and sampling never gives it (docs/benchmarks.md).
      noise=dict(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                 beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True),
  )
  # Trained parameters, by path prefix. The release trains embeddings, lm_head, edit head and UNet
  # of a pretrained LLaVA; from random weights the whole MLLM has to learn.
  c.trainable = ("mllm", "edit_head", "unet")
  c.pretrained = dict(vae="synthetic")    # "synthetic": trained on the first run into <workdir>/data/vae
  c.vae_training = dict(steps=800, batch_size=16, lr=2e-3, kl_weight=1e-6)

  c.data = dict(
      dir="",                              # built TFDS dataset; "" = generate synthetic into workdir
      tokenizer="",                        # "" = the synthetic dataset's tokenizer
      synthetic=dict(prompts=200, seeds=2, size=64, grounded=0.3,
                     kinds=""),            # "" all edit kinds, or some, e.g. "background,recolor"
      resolution=32, max_length=96, num_threads=4, worker_count=0,
      length_buckets=(),                   # e.g. (64, 80): batches cut to the shortest that fits
                                           # (one compiled step per length; same losses)
      text_length=0,                       # > 0: the terse instruction's tokens too (kind="ip2p")
      shards=0,                            # data shards (0: one per process); fix it to make runs
                                           # on different host counts read identical batches
  )

  c.train = dict(
      steps=1500,
      batch_size=8,                        # global, per optimizer step
      grad_accum=1,                        # micro-batches the batch is split into (memory)
      lr_mllm=1e-3, lr_diffusion=2e-3, warmup_frac=0.03, grad_clip=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      # The release weighs L_ins 1 and L_edit 0.5. A tiny LLM trained from scratch fits the text in
      # a few hundred steps, and L_ins then pulls the [IMG] states towards the fixed next tokens
      # they predict (collapsing them across examples): weighted down, they keep what the edit
      # head needs, and the text is still learned (teacher-forced token accuracy ~0.93).
      ins_loss_weight=0.02, edit_loss_weight=1.0,
      min_snr_gamma=0.0,                   # > 0: Min-SNR-gamma weights on the diffusion loss
      # > 0: keep an EMA of the trained weights (decay warmed up as (1 + t) / (10 + t), capped
      # here); samples, validation, edit, evaluate and export then use it. Off: on this recipe it
      # helped three runs and hurt a fourth (docs/benchmarks.md).
      ema_decay=0.0,
  )

  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.rules = DEFAULT_RULES

  # Persistent compilation cache: "auto" = <workdir>/compile_cache, "" = off, or a path.
  c.compile_cache = "auto"
  c.compile_cache_min_seconds = 0.0       # cache every compile (small ones too: restarts in seconds)
  c.checkpoint = dict(every=250, keep=3, async_save=True,
                      restore_step=placeholder(int))   # restore this step instead of the latest
  c.log = dict(every=50, tensorboard=True, sample_every=750, samples=4, sample_steps=20,
               sample_new_tokens=40)
  # Validation: edit the split's examples and compare their L1 with copying the input.
  c.eval = dict(at_end=True, every=0, split="test", examples=0, batch_size=16, sampler="euler_ancestral",
                sample_steps=20, text_scale=4.0, image_scale=1.5, max_new_tokens=40)
  return c
