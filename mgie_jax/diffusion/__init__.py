"""Noise schedules, samplers and InstructPix2Pix guided sampling as pure JAX functions."""

from mgie_jax.diffusion.guidance import draw_noise, edit_images, guided_eps, sample_loop
from mgie_jax.diffusion.samplers import Sampler, SamplerConfig, make_sampler
from mgie_jax.diffusion.schedule import DDPMSchedule, NoiseSchedule, alphas_cumprod, make_betas
