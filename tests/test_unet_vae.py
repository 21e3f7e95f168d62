import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import max_err, tol
from mgie_jax.convert import from_pretrained, CheckpointError, export_state_dict
from mgie_jax.convert.diffusion import derived_rules, unet_from_state_dict, widen_unet
from mgie_jax.models import AutoencoderKL, UNet2DConditionModel

# One SD-2-like config (linear projection, per-block heads, odd sin/cos options) and one
# InstructPix2Pix-like config (8 input channels, conv projection, heads as an int).
UNET_A = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
              layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=24, attention_head_dim=(2, 4, 4), use_linear_projection=True,
              flip_sin_to_cos=False, freq_shift=1, norm_num_groups=8)
UNET_B = dict(sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
              attention_head_dim=4, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
           latent_channels=4, norm_num_groups=8)


@nnx.jit
def run(model, *args):
  """Call a model under jit (eager NNX dispatches every op separately and is slow)."""
  return model(*args)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def saved(tmp_path_factory, cls, cfg, name, seed=0):
  torch.manual_seed(seed)
  model = cls(**cfg).eval()
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  return str(path), model


@pytest.fixture(scope="module")
def unet_a(tmp_path_factory):
  return saved(tmp_path_factory, diffusers.UNet2DConditionModel, UNET_A, "unet_a")


@pytest.fixture(scope="module")
def unet_b(tmp_path_factory):
  return saved(tmp_path_factory, diffusers.UNet2DConditionModel, UNET_B, "unet_b", seed=1)


@pytest.fixture(scope="module")
def unet_four(tmp_path_factory):
  """UNET_B with Stable Diffusion's 4 input channels: the model that widening turns into UNET_B's shape."""
  return saved(tmp_path_factory, diffusers.UNet2DConditionModel, dict(UNET_B, in_channels=4), "unet_four", seed=3)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  return saved(tmp_path_factory, diffusers.AutoencoderKL, VAE, "vae", seed=2)


def unet_inputs(channels, seed=0, batch=2):
  g = torch.Generator().manual_seed(seed)
  return (torch.randn(batch, channels, 16, 16, generator=g), torch.tensor([3, 871][:batch]),
          torch.randn(batch, 7, 24, generator=g))


@pytest.mark.parametrize("fixture", ["unet_a", "unet_b"])
def test_unet_parity(fixture, request):
  path, ref = request.getfixturevalue(fixture)
  ours = from_pretrained(UNet2DConditionModel, path)
  x, t, c = unet_inputs(ref.config.in_channels)
  with torch.no_grad():
    want = ref(x, t, encoder_hidden_states=c).sample.numpy()
  got = nchw(run(ours, nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(c.numpy())))
  assert max_err(got, want) <= tol(want)
  if fixture == "unet_a":   # the options this config exists to exercise really were read
    assert ours.config.use_linear_projection and ours.config.heads == (2, 4, 4)
    assert not ours.config.flip_sin_to_cos and ours.config.freq_shift == 1


def test_widened_unet_equals_four_channel_unet(unet_four, tmp_path):
  path, ref = unet_four
  four = from_pretrained(UNet2DConditionModel, path)
  eight = widen_unet(four, 8)
  loaded = from_pretrained(UNet2DConditionModel, path, in_channels=8)   # widening at load time
  assert eight.config.in_channels == 8 and eight.conv_in.kernel.shape == (3, 3, 8, 32)
  x, t, c = unet_inputs(4, seed=1)
  t, c = jnp.asarray(t.numpy()), jnp.asarray(c.numpy())
  np.testing.assert_array_equal(np.asarray(loaded.conv_in.kernel[...]), np.asarray(eight.conv_in.kernel[...]))
  assert (eight.conv_in.kernel[...][:, :, 4:] == 0).all()
  # Zero weights on channels 4-7: identical output whatever the extra channels hold.
  extra = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  want = run(four, nhwc(x), t, c)
  noisy = run(eight, jnp.concatenate([nhwc(x), extra], -1), t, c)
  np.testing.assert_array_equal(np.asarray(noisy), np.asarray(want))


def test_bare_unet_state_dict_like_mgie_unet_pt(unet_b, tmp_path):
  """MGIE's unet.pt: a diffusers state dict without prefix, loaded with torch.load(weights_only=True)."""
  path, ref = unet_b
  torch.save({k: v.half() for k, v in ref.state_dict().items()}, tmp_path / "unet.pt")
  ours = unet_from_state_dict(str(tmp_path / "unet.pt"), path)
  assert ours.config.in_channels == 8
  want = ref.state_dict()["conv_in.weight"].half().float().numpy()
  assert max_err(np.asarray(ours.conv_in.kernel[...]).transpose(3, 2, 0, 1), want) == 0.0
  exported = export_state_dict(ours, derived_rules(ours))
  assert set(exported) == set(ref.state_dict())


def test_broken_unet_checkpoint_lists_every_problem(unet_b, tmp_path):
  path, _ = unet_b
  sd = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  del sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  sd["up_blocks.1.resnets.0.conv1.weight"] = torch.zeros(32, 96, 3, 1)
  sd["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] = torch.zeros(7, 32)
  sd["add_embedding.linear_1.weight"] = torch.zeros(4, 4)
  save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
  with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  with pytest.raises(CheckpointError) as err:
    from_pretrained(UNet2DConditionModel, str(tmp_path))
  msg = str(err.value)
  assert len(err.value.problems) == 4, msg
  assert "missing tensor mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight" in msg
  assert "up_blocks.1.resnets.0.conv1.weight: shape mismatch" in msg
  assert "ff.net.0.proj.weight: shape mismatch" in msg
  assert "unexpected tensor add_embedding.linear_1.weight" in msg


def test_unsupported_unet_options_are_named(unet_b, tmp_path):
  with open(os.path.join(unet_b[0], "config.json")) as f:
    cfg = json.load(f)
  cfg.update(addition_embed_type="text_time", upcast_attention=True)
  os.makedirs(tmp_path / "u")
  shutil.copy(os.path.join(unet_b[0], "diffusion_pytorch_model.safetensors"), tmp_path / "u")
  with open(tmp_path / "u" / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="addition_embed_type.*upcast_attention"):
    from_pretrained(UNet2DConditionModel, str(tmp_path / "u"))


def test_unet_rejects_bad_sample_shapes(unet_b):
  ours = from_pretrained(UNet2DConditionModel, unet_b[0])
  c = jnp.zeros((1, 7, 24))
  with pytest.raises(ValueError, match="8 channels"):
    ours(jnp.zeros((1, 16, 16, 4)), 1, c)
  with pytest.raises(ValueError, match="multiples of 2"):
    ours(jnp.zeros((1, 15, 16, 8)), 1, c)


@pytest.mark.slow
def test_unet_remat_same_output_and_grads(unet_b):
  path, _ = unet_b
  x, t, c = unet_inputs(8, seed=3)
  x, t, c = nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(c.numpy())
  loss = lambda m: jnp.mean(m(x, t, c) ** 2)
  plain, remat = from_pretrained(UNet2DConditionModel, path), from_pretrained(UNet2DConditionModel, path, remat=True)
  grad = nnx.jit(nnx.grad(loss))
  g1, g2 = grad(plain), grad(remat)
  a = g1.conv_in.kernel[...]
  assert max_err(g2.conv_in.kernel[...], a) <= tol(a) and float(jnp.abs(a).max()) > 0


def test_vae_encode_decode_parity(vae):
  path, ref = vae
  ours = from_pretrained(AutoencoderKL, path)
  img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
  with torch.no_grad():
    post = ref.encode(img).latent_dist
    dec = ref.decode(post.mean).sample.numpy()
  p = nnx.jit(lambda m, x: m.encode(x))(ours, nhwc(img))
  assert max_err(nchw(p.mean), post.mean.numpy()) <= tol(post.mean.numpy())
  assert max_err(nchw(p.logvar), post.logvar.numpy()) <= tol(post.logvar.numpy())
  assert max_err(nchw(nnx.jit(lambda m, z: m.decode(z))(ours, nhwc(post.mean.numpy()))), dec) <= tol(dec)
  # sample = mean + std * N(0, 1) with an explicit key
  key = jax.random.key(1)
  eps = jax.random.normal(key, p.mean.shape)
  assert max_err(p.sample(key), p.mean + p.std * eps) == 0.0
  assert ours.config.scaling_factor == pytest.approx(ref.config.scaling_factor)
  exported = export_state_dict(ours, derived_rules(ours))
  assert set(exported) == set(ref.state_dict())
