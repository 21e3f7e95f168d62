"""The full recipe with LoRA in place of UNet full fine-tuning: adapters of rank 16 on every LLaMA
attention and MLP projection and on the UNet's attention projections; the release's trained set
otherwise (embed_tokens, lm_head, edit head). The UNet's 860M weights stay frozen in bf16, so
neither fp32 master copies nor Adam moments are kept for them (`mgie_jax.compile` prices it).

  python -m mgie_jax.train --config=configs/ipr2pr_lora.py --workdir=W --config.pretrained.llava=... \\
      --config.pretrained.vision_tower=... --config.pretrained.sd=... --config.data.dir=...
"""

from configs import ipr2pr


def get_config(arg=None):
  c = ipr2pr.get_config(arg)
  c.model.lora = dict(rank=16, alpha=16.0, dropout=0.05, targets=("llm_attention", "llm_mlp", "unet_attention"))
  c.trainable = ("mllm.language_model.model.embed_tokens", "mllm.language_model.lm_head", "edit_head")
  c.train.lr_diffusion = 1e-4            # LoRA factors on the UNet (a guess: diffusers' LoRA scripts use 1e-4)
  return c
