"""Tiny MGIE on the built-in synthetic edit dataset: random init, learns its edits on 2 CPU cores
in a few minutes.

  python -m mgie_jax.train --config=configs/tiny.py --workdir=/tmp/mgie_tiny

On the first run, <workdir>/data receives the synthetic dataset (plain and grounded edits), its
tokenizer, and a small VAE trained on its images (saved as a diffusers folder and then loaded
frozen, exactly as SD's VAE is in the full recipe). Training ends with a validation summary:
the edits' L1 on the test split against copying the input. Why each value is what it is:
docs/tiny_recipe.md.
"""

from configs import shared


def get_config(arg=None):
  c = shared.get_config(arg)
  c.model.update(
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
      # trained from scratch learns to read and sampling never gives it.
      noise=dict(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                 beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True),
  )
  # From random weights the whole MLLM has to learn (the release trains only its embeddings and lm_head).
  c.trainable = ("mllm", "edit_head", "unet")
  c.pretrained.vae = "synthetic"          # trained on the first run into <workdir>/data/vae
  c.vae_training = dict(steps=800, batch_size=16, lr=2e-3, kl_weight=1e-6)

  c.data.update(
      dir="",                              # "": generate the synthetic dataset into the workdir
      synthetic=dict(prompts=200, seeds=2, size=64, grounded=0.3,
                     kinds=""),            # "" all edit kinds, or some, e.g. "background,recolor"
      resolution=32, max_length=96,
  )
  c.train.update(
      steps=1500, batch_size=8, lr_mllm=1e-3, lr_diffusion=2e-3,
      # A tiny LLM trained from scratch fits the text in a few hundred steps, and L_ins then pulls
      # the [IMG] states towards the fixed next tokens they predict (collapsing them across
      # examples): weighted down, they keep what the edit head needs, and the text is still
      # learned (teacher-forced token accuracy ~0.93).
      ins_loss_weight=0.02, edit_loss_weight=1.0,
      ema_decay=0.0,                       # helped three runs and hurt a fourth here
  )
  c.compile_cache_min_seconds = 0.0        # cache every compile (small ones too: restarts in seconds)
  c.checkpoint.every = 250
  c.log.update(sample_every=750, sample_steps=20, sample_new_tokens=40)
  c.eval.update(split="test", batch_size=16, sample_steps=20, text_scale=4.0, max_new_tokens=40)
  return c
