"""Tiny MGIE on the built-in synthetic edit dataset: random init, trains on 2 CPU cores in minutes.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny

The synthetic dataset and its tokenizer are generated into <workdir>/data on the first run.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mgie_jax.parallel import DEFAULT_RULES


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = dict(
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
      edit_head=dict(llm_dim=64, width=32, heads=4, ffn=64, encoder_layers=1, decoder_layers=1,
                     num_queries=77, out_dim=32),
      unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                cross_attention_dim=32, norm_num_groups=8),
      vae=dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
      # The DDPM training schedule (SD's); inference samples on the same one.
      noise=dict(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                 beta_end=0.012, prediction_type="epsilon"),
  )
  # Trained parameters, by path prefix (the release: embeddings, lm_head, edit head, UNet).
  c.trainable = ("mllm.language_model.model.embed_tokens", "mllm.language_model.lm_head",
                 "edit_head", "unet")

  c.data = dict(
      dir="",                              # built TFDS dataset; "" = generate synthetic into workdir
      tokenizer="",                        # "" = the synthetic dataset's tokenizer
      synthetic=dict(prompts=96, seeds=2, size=64),
      resolution=32, max_length=96, num_threads=4, worker_count=0,
      shards=0,                            # data shards (0: one per process); fix it to make runs
                                           # on different host counts read identical batches
  )

  c.train = dict(
      steps=300,
      batch_size=8,                        # global, per optimizer step
      grad_accum=1,                        # micro-batches the batch is split into (memory)
      lr_mllm=1e-3, lr_diffusion=1e-3, warmup_frac=0.03, grad_clip=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      ins_loss_weight=1.0, edit_loss_weight=0.5,
  )

  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.rules = DEFAULT_RULES

  c.checkpoint = dict(every=50, keep=3, async_save=True,
                      restore_step=placeholder(int))   # restore this step instead of the latest
  c.log = dict(every=10, tensorboard=True, sample_every=150, samples=2, sample_steps=10,
               sample_new_tokens=24)
  return c
