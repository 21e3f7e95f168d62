"""Weight import and export between PyTorch checkpoints and mgie_jax modules.

Models know nothing of files; loading a model from a local folder goes through here:

  from mgie_jax.convert import from_pretrained
  llama = from_pretrained(LlamaForCausalLM, "path/to/folder", dtype="bfloat16")
"""

from mgie_jax.convert.diffusion import unet_from_pretrained, vae_from_pretrained
from mgie_jax.convert.mapping import Rule, export_state_dict, load_module
from mgie_jax.convert.metric_models import clip_from_pretrained, vit_from_pretrained
from mgie_jax.convert.mllm import clip_vision_from_pretrained, llama_from_pretrained, llava_from_pretrained
from mgie_jax.convert.t5_weights import t5_from_pretrained
from mgie_jax.convert.torch_files import CheckpointError, open_weights, read_config
from mgie_jax.models import (AutoencoderKL, ClipVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration,
                             UNet2DConditionModel)
from mgie_jax.models.clip import ClipModel
from mgie_jax.models.t5 import T5ForConditionalGeneration
from mgie_jax.models.vit import ViTModel

# model class -> the loader of its PyTorch-side folder (transformers' or diffusers' save_pretrained)
LOADERS = {
    LlamaForCausalLM: llama_from_pretrained,
    ClipVisionModel: clip_vision_from_pretrained,
    LlavaForConditionalGeneration: llava_from_pretrained,
    UNet2DConditionModel: unet_from_pretrained,
    AutoencoderKL: vae_from_pretrained,
    ClipModel: clip_from_pretrained,
    ViTModel: vit_from_pretrained,
    T5ForConditionalGeneration: t5_from_pretrained,
}


def from_pretrained(cls, path: str, dtype=None, **kwargs):
  """An instance of model class `cls` with the weights of the local folder `path`."""
  if cls not in LOADERS:
    raise TypeError(f"no loader for {cls.__name__}; loadable: {', '.join(c.__name__ for c in LOADERS)}")
  return LOADERS[cls](path, dtype, **kwargs)
