import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module
from flax import nnx

from conftest import max_err
from mgie_jax.diffusion import DDPMSchedule, SamplerConfig, edit_images, make_sampler
from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.models import AutoencoderKL, UNet2DConditionModel
from mgie_jax.convert import from_pretrained

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = 20
CASES = [
    (diffusers.EulerAncestralDiscreteScheduler, dict(timestep_spacing="linspace")),
    (diffusers.EulerAncestralDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (diffusers.EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    (diffusers.DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)),
    (diffusers.DDIMScheduler, dict(timestep_spacing="trailing", set_alpha_to_one=False)),
    (diffusers.DDIMScheduler, dict(timestep_spacing="linspace", clip_sample=False,
                                   prediction_type="v_prediction")),
    # Zero terminal SNR (pure noise at t = 999; Euler's first sigma is then 4096).
    (diffusers.EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                                     rescale_betas_zero_snr=True)),
    (diffusers.EulerDiscreteScheduler, dict(timestep_spacing="linspace", prediction_type="v_prediction",
                                            rescale_betas_zero_snr=True)),
    (diffusers.DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=False, prediction_type="v_prediction",
                                   rescale_betas_zero_snr=True)),
]


def ours_for(scheduler, steps, **overrides):
  cfg = SamplerConfig.from_diffusers({**scheduler.config, "_class_name": type(scheduler).__name__},
                                     **overrides)
  return make_sampler(cfg, steps)


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_sampler_trajectory_matches_diffusers(cls, kw, monkeypatch):
  """Same model outputs and noise each step: the whole 20-step trajectory agrees to 1e-5 (relative)."""
  ref = cls(**SD, **kw)
  ref.set_timesteps(STEPS)
  ours = ours_for(ref, STEPS)
  np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
  assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
  rng = np.random.default_rng(0)
  outputs = rng.normal(size=(STEPS, 2, 4, 8, 8)).astype(np.float32)
  noises = rng.normal(size=(STEPS, 2, 4, 8, 8)).astype(np.float32)
  queue = [torch.as_tensor(n) for n in noises]
  monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, **k: queue.pop(0))
  x0 = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
  xt, xo = torch.as_tensor(x0) * ref.init_noise_sigma, jnp.asarray(x0) * ours.init_noise_sigma
  step = jax.jit(lambda i, x, out, n: ours.step(i, x, out, n))
  for i, t in enumerate(ref.timesteps):
    scaled = ours.scale_model_input(i, xo)
    assert max_err(scaled, ref.scale_model_input(xt, t)) <= 1e-5 * max(1.0, float(jnp.abs(scaled).max()))
    xt = ref.step(torch.as_tensor(outputs[i]), t, xt).prev_sample
    xo = step(i, xo, jnp.asarray(outputs[i]), jnp.asarray(noises[i]))
    scale = max(1.0, float(np.abs(xt.numpy()).max()))
    assert max_err(xo, xt.numpy()) <= 1e-5 * scale, f"step {i}"
  if cls is diffusers.EulerAncestralDiscreteScheduler:
    assert not queue, "every step must have drawn noise"


def test_ddim_with_eta_uses_the_noise():
  ref = diffusers.DDIMScheduler(**SD, clip_sample=False, steps_offset=1)
  ref.set_timesteps(STEPS)
  ours = ours_for(ref, STEPS, eta=0.7)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
  xt, xo = torch.as_tensor(x), jnp.asarray(x)
  for i, t in enumerate(ref.timesteps):
    out, noise = rng.normal(size=(2, 1, 4, 8, 8)).astype(np.float32)
    xt = ref.step(torch.as_tensor(out), t, xt, eta=0.7, variance_noise=torch.as_tensor(noise)).prev_sample
    xo = ours.step(i, xo, jnp.asarray(out), jnp.asarray(noise))
    assert max_err(xo, xt.numpy()) <= 1e-5 * max(1.0, float(np.abs(xt.numpy()).max()))


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_training_schedule_matches_ddpm(beta_schedule):
  kw = dict(beta_schedule=beta_schedule, beta_start=0.00085 if beta_schedule == "scaled_linear" else 1e-4,
            beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02)
  ref = diffusers.DDPMScheduler(**kw)
  ours = DDPMSchedule.create(**kw)
  assert max_err(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6
  rng = np.random.default_rng(2)
  x0, noise = (rng.normal(size=(4, 4, 8, 8)).astype(np.float32) for _ in range(2))
  t = np.array([0, 17, 500, 999])
  want = ref.add_noise(torch.as_tensor(x0), torch.as_tensor(noise), torch.as_tensor(t)).numpy()
  assert max_err(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want) <= 1e-6
  want_v = ref.get_velocity(torch.as_tensor(x0), torch.as_tensor(noise), torch.as_tensor(t)).numpy()
  assert max_err(ours.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want_v) <= 1e-6
  v = DDPMSchedule.create(**kw, prediction_type="v_prediction")
  assert max_err(v.target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want_v) <= 1e-6
  assert max_err(ours.target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), noise) == 0.0


def test_zero_terminal_snr_training_schedule_matches_ddpm():
  """rescale_betas_zero_snr: alpha-bar as diffusers computes it, exactly 0 at the last step, where
  the noisy latents are pure noise and the v target is -x0."""
  ref = diffusers.DDPMScheduler(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
  ours = NoiseSchedule(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True).ddpm()
  assert max_err(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) <= 1e-6
  assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.alphas_cumprod[0]) == pytest.approx(1 - 0.00085)
  rng = np.random.default_rng(3)
  x0, noise = (rng.normal(size=(3, 4, 8, 8)).astype(np.float32) for _ in range(2))
  t = np.array([0, 500, 999])
  want = ref.add_noise(torch.as_tensor(x0), torch.as_tensor(noise), torch.as_tensor(t)).numpy()
  # 1e-5: at t = 0, sqrt(1 - alpha-bar) with 1 - alpha-bar = 8.5e-4 turns the two float32 rescalings'
  # 1e-7 difference in alpha-bar into ~3e-6 relative.
  assert max_err(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want) <= 1e-5
  np.testing.assert_array_equal(np.asarray(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))[2], noise[2])
  want_v = ref.get_velocity(torch.as_tensor(x0), torch.as_tensor(noise), torch.as_tensor(t)).numpy()
  assert max_err(ours.target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want_v) <= 1e-5
  np.testing.assert_array_equal(np.asarray(ours.target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))[2], -x0[2])
  with pytest.raises(ValueError, match="v_prediction"):
    NoiseSchedule(rescale_betas_zero_snr=True)


def test_sampler_config_errors():
  with pytest.raises(ValueError, match="not supported"):
    SamplerConfig.from_diffusers({"_class_name": "LMSDiscreteScheduler"})
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    SamplerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
  with pytest.raises(ValueError, match="num_steps"):
    make_sampler(SamplerConfig(), 0)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).eval()
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                layers_per_block=1, latent_channels=4, norm_num_groups=8).eval()
  scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD)
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
      vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  path = tmp_path_factory.mktemp("ip2p")
  pipe.save_pretrained(path)
  return str(path), pipe


def test_guided_sampler_matches_instructpix2pix_pipeline(tiny_pipeline, monkeypatch):
  path, pipe = tiny_pipeline
  steps, rng = 12, np.random.default_rng(3)
  images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  g = torch.Generator().manual_seed(4)
  cond, null = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 24, generator=g)
  latents = torch.randn(2, 4, 8, 8, generator=g)
  noise = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(steps)]
  queue = list(noise)
  monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, **k: queue.pop(0))
  want = pipe(image=torch.as_tensor(images.transpose(0, 3, 1, 2)), prompt_embeds=cond,
              negative_prompt_embeds=null, latents=latents.clone(), num_inference_steps=steps,
              guidance_scale=7.5, image_guidance_scale=1.5, output_type="np").images
  assert not queue
  unet = from_pretrained(UNet2DConditionModel, path)          # reads the pipeline's unet/ folder
  vae = from_pretrained(AutoencoderKL, path)
  sampler = ours_for(pipe.scheduler, steps)
  got = edit_images(unet, vae, sampler, jnp.asarray(images * 2 - 1), jnp.asarray(cond.numpy()),
                    jnp.asarray(null.numpy()), latents=jnp.asarray(latents.numpy().transpose(0, 2, 3, 1)),
                    noise=jnp.asarray(np.stack([n.numpy().transpose(0, 2, 3, 1) for n in noise])),
                    text_scale=7.5, image_scale=1.5)
  assert got.shape == want.shape == (2, 16, 16, 3)
  assert max_err(got, want) <= 1e-3
  # From a key: deterministic, and the key matters.
  kw = dict(text_scale=7.5, image_scale=1.5)
  args = (unet, vae, sampler, jnp.asarray(images * 2 - 1), jnp.asarray(cond.numpy()), jnp.asarray(null.numpy()))
  a = edit_images(*args, key=jax.random.key(0), **kw)
  b = edit_images(*args, key=jax.random.key(0), **kw)
  c = edit_images(*args, key=jax.random.key(1), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert max_err(a, c) > 1e-3
  with pytest.raises(ValueError, match="PRNG key"):
    edit_images(*args, **kw)
