"""The tiny recipe with LoRA: adapters (rank 4) on the LLaMA's attention and MLP projections and on
the UNet's attention projections; besides them only the release's trained set (embed_tokens,
lm_head, the edit head) trains. The towers stay frozen at their seeded initialisation, so this
trains far less than configs/tiny.py and is for testing the LoRA path end to end, not for edits.

  python -m mgie_jax.train --config=configs/tiny_lora.py --workdir=/tmp/mgie_tiny_lora
  python -m mgie_jax.export --workdir=/tmp/mgie_tiny_lora --out=/tmp/lora_out --format=peft,llava-v1,diffusers
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.model.lora = dict(rank=4, alpha=8.0, dropout=0.0, targets=("llm_attention", "llm_mlp", "unet_attention"))
  c.trainable = ("mllm.language_model.model.embed_tokens", "mllm.language_model.lm_head", "edit_head")
  return c
