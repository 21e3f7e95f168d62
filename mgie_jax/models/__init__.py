"""Flax NNX ports of MGIE's models."""

from mgie_jax.models.clip import ClipVisionConfig, ClipVisionModel, ClipVisionOutput
from mgie_jax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaOutput
from mgie_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from mgie_jax.models.unet import UNet2DConditionModel, UNetConfig
from mgie_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = [
    "ClipVisionConfig", "ClipVisionModel", "ClipVisionOutput",
    "LlamaConfig", "LlamaForCausalLM", "LlamaOutput",
    "LlavaConfig", "LlavaForConditionalGeneration",
    "UNet2DConditionModel", "UNetConfig",
    "AutoencoderKL", "DiagonalGaussian", "VAEConfig",
]
