import dataclasses

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import TINY_CLIP, TINY_LLAMA, max_err, tol
from mgie_jax.convert.release import edit_head_from_state_dict
from mgie_jax.models import AutoencoderKL, LlavaForConditionalGeneration, UNet2DConditionModel
from mgie_jax.models.edit_head import EditHeadConfig
from mgie_jax.models.mgie import MGIE, Draws, MGIEConfig
from mgie_jax.convert import from_pretrained

HEAD = EditHeadConfig(llm_dim=64, width=32, heads=4, ffn=48, encoder_layers=2, decoder_layers=2,
                      num_queries=7, out_dim=24)
IMG0, IMAGE_TOKEN = 100, 120


class EditMapper(torch.nn.Module):
  """The official MGIE edit head, written as the release writes it (sizes shrunk)."""

  def __init__(self, c: EditHeadConfig):
    super().__init__()
    self.llm2hid = torch.nn.Linear(c.llm_dim, c.width)
    self.query = torch.nn.Parameter(torch.randn(1, c.num_queries, c.width))
    self.mapper = torch.nn.Transformer(batch_first=True, norm_first=True, d_model=c.width, nhead=c.heads,
                                       num_encoder_layers=c.encoder_layers, num_decoder_layers=c.decoder_layers,
                                       dim_feedforward=c.ffn, dropout=0.0)
    self.hid2feat = torch.nn.Linear(c.width, c.out_dim)

  def forward(self, llm, emb):
    hid = self.llm2hid(llm + emb)
    hid = self.mapper(hid, self.query.repeat(llm.shape[0], 1, 1))
    return self.hid2feat(hid)


@pytest.fixture(scope="module")
def torch_parts(tmp_path_factory):
  torch.manual_seed(0)
  head = EditMapper(HEAD).eval()
  for p in head.parameters():           # nn.Transformer's init is tiny; make outputs non-trivial
    p.data.normal_(0, 0.2)
  llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
      vision_config={**TINY_CLIP, "model_type": "clip_vision_model"},
      text_config={**TINY_LLAMA, "model_type": "llama"}, image_token_id=IMAGE_TOKEN)).eval()
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).eval()
  vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                                norm_num_groups=8).eval()
  root = tmp_path_factory.mktemp("mgie_parts")
  llava.save_pretrained(root / "llava")
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  return root, head, llava, unet, vae


def test_edit_head_matches_official_nn_transformer(torch_parts):
  _, head, *_ = torch_parts
  # As in the released mllm.pt: edit_head.* next to the LLM's own keys.
  sd = {"edit_head." + k: v.detach().numpy() for k, v in head.state_dict().items()}
  sd["model.embed_tokens.weight"] = np.zeros((4, 64), np.float32)
  ours = edit_head_from_state_dict(sd, HEAD)
  g = torch.Generator().manual_seed(1)
  h, e = torch.randn(3, 8, 64, generator=g), torch.randn(8, 64, generator=g)
  with torch.no_grad():
    want = head(h, e).numpy()
  got = ours(jnp.asarray(h.numpy()), jnp.asarray(e.numpy()))
  assert got.shape == (3, 7, 24)
  assert max_err(got, want) <= tol(want)


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  rows, labels = [], []
  for n in range(4):
    prompt = [1] + rng.integers(3, 99, 3 + n).tolist() + [IMAGE_TOKEN] * 16 + rng.integers(3, 99, 2).tolist()
    answer = rng.integers(3, 99, 4 - n % 2).tolist() + list(range(IMG0, IMG0 + 8)) + [2]
    rows.append(prompt + answer)
    labels.append([-100] * len(prompt) + answer)
  length = max(map(len, rows)) + 2
  ids = np.zeros((4, length), np.int32)
  lab = np.full((4, length), -100, np.int32)
  mask = np.zeros((4, length), np.int32)
  for i, (r, l) in enumerate(zip(rows, labels)):
    ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = r, l, 1
  images = rng.uniform(-1, 1, (3, 4, 16, 16, 3)).astype(np.float32)
  return {"input_ids": ids, "labels": lab, "attention_mask": mask,
          "clip_image": rng.normal(size=(4, 28, 28, 3)).astype(np.float32),
          "input_image": images[0], "edited_image": images[1]}


def torch_reference_loss(head, llava, unet, vae, batch, draws: Draws):
  """The official training forward (mgie_train.py), recomputed in PyTorch."""
  t = lambda x: torch.as_tensor(np.asarray(x))
  nchw = lambda x: t(np.asarray(x).transpose(0, 3, 1, 2))
  ids = t(batch["input_ids"]).long()
  with torch.no_grad():
    out = llava(input_ids=ids, pixel_values=nchw(batch["clip_image"]), attention_mask=t(batch["attention_mask"]),
                output_hidden_states=True)
    logits, labels = out.logits[:, :-1], t(batch["labels"])[:, 1:].long()
    l_ins = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100)
    hid = out.hidden_states[-1]
    pos = [int((row == IMG0).nonzero()[0]) for row in ids]
    h = torch.stack([hid[i, p - 1:p + 7] for i, p in enumerate(pos)])
    e = llava.get_input_embeddings().weight[IMG0:IMG0 + 8]
    cond, null = head(h, e), head(torch.zeros_like(h), e)
    post = vae.encode(nchw(batch["edited_image"])).latent_dist
    latents = (post.mean + post.std * nchw(draws.posterior)) * vae.config.scaling_factor
    image_latents = vae.encode(nchw(batch["input_image"])).latent_dist.mean
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    noise, steps = nchw(draws.noise), t(draws.t).long()
    noisy = sched.add_noise(latents, noise, steps)
    p = t(draws.p)
    prompt_mask = (p < 2 * 0.05).reshape(-1, 1, 1)
    cond = torch.where(prompt_mask, null, cond)
    input_mask = 1 - ((p >= 0.05) & (p < 3 * 0.05)).float().reshape(-1, 1, 1, 1)
    pred = unet(torch.cat([noisy, image_latents * input_mask], 1), steps, encoder_hidden_states=cond).sample
    l_edit = torch.nn.functional.mse_loss(pred, noise)
  return float(l_ins), float(l_edit), float(l_ins + 0.5 * l_edit)


def load_ours(root, head):
  sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
  parts = (from_pretrained(LlavaForConditionalGeneration, str(root / "llava")),
           edit_head_from_state_dict(sd, HEAD, prefix=""),
           from_pretrained(UNet2DConditionModel, str(root / "unet")),
           from_pretrained(AutoencoderKL, str(root / "vae")))
  cfg = MGIEConfig(llava=parts[0].config, edit_head=HEAD, unet=parts[2].config, vae=parts[3].config,
                   img_token_id=IMG0)
  return MGIE.from_parts(cfg, *parts)


def test_mgie_loss_matches_pytorch_recomputation(torch_parts):
  root, head, llava, unet, vae = torch_parts
  model = load_ours(root, head)
  batch = make_batch()
  rng = np.random.default_rng(5)
  draws = Draws(p=jnp.asarray([0.01, 0.07, 0.12, 0.6], jnp.float32),    # text / both / image / none dropped
                t=jnp.asarray([5, 250, 600, 999]),
                noise=jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32),
                posterior=jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32))
  want_ins, want_edit, want = torch_reference_loss(head, llava, unet, vae, batch, draws)
  got = nnx.jit(lambda m, b, d: m.losses(b, d))(model, {k: jnp.asarray(v) for k, v in batch.items()}, draws)
  assert abs(float(got["ins"]) - want_ins) <= 1e-4 * max(1, abs(want_ins))
  assert abs(float(got["edit"]) - want_edit) <= 1e-4 * max(1, abs(want_edit))
  assert abs(float(got["loss"]) - want) <= 1e-4 * max(1, abs(want))
  # The dropout branches matter: with no draw below 0.15 the loss differs.
  other = nnx.jit(lambda m, b, d: m.losses(b, d))(
      model, {k: jnp.asarray(v) for k, v in batch.items()}, draws._replace(p=jnp.full((4,), 0.9)))
  assert abs(float(other["edit"]) - want_edit) > 1e-6


def test_rows_without_img0_are_left_out_of_the_edit_loss_and_refused_in_inference(torch_parts):
  """A row with no [IMG0] has no window to read: it must not silently read position 0."""
  root, head, *_ = torch_parts
  model = load_ours(root, head)
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  rng = np.random.default_rng(5)
  draws = Draws(p=jnp.full((4,), 0.9), t=jnp.asarray([5, 250, 600, 999]),
                noise=jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32),
                posterior=jnp.asarray(rng.normal(size=(4, 8, 8, 4)), jnp.float32))
  broken = dict(batch, input_ids=jnp.where(batch["input_ids"][1] >= IMG0, 5, batch["input_ids"][1]))
  broken["input_ids"] = batch["input_ids"].at[1].set(broken["input_ids"])
  losses = nnx.jit(lambda m, b, d: m.losses(b, d))
  got = losses(model, broken, draws)
  assert int(got["no_img"]) == 1
  keep = np.array([0, 2, 3])
  sub = lambda tree: jax.tree.map(lambda x: x[keep], tree)
  want = losses(model, sub(batch), Draws(*sub(tuple(draws))))
  assert abs(float(got["edit"]) - float(want["edit"])) <= 1e-5 * max(1.0, float(want["edit"]))
  assert int(losses(model, batch, draws)["no_img"]) == 0
  from mgie_jax.inference.pipeline import conditions_for
  with pytest.raises(ValueError, match=r"rows \[1\] hold no \[IMG0\]"):
    conditions_for(model, np.asarray(broken["input_ids"]), np.asarray(batch["attention_mask"]),
                   np.asarray(batch["clip_image"]))


def test_full_model_from_pretrained_folders(torch_parts, tmp_path, clip_dir, sp_dir):
  """configs/ipr2pr.py's loading path on tiny folders: LLaVA v1 + CLIP + an SD pipeline folder,
  the vocabulary grown by the MGIE tokens (new rows ~ N(0, 0.02)), the UNet widened to 8 channels."""
  import json
  import os
  from safetensors.torch import save_file
  from configs import ipr2pr
  from mgie_jax.text import LlamaTokenizer
  from mgie_jax.run import model as model_lib
  root, head, llava_t, unet_t, vae_t = torch_parts
  # LLaVA v1 folder with a 400-token vocabulary (the tokenizer's SentencePiece size).
  torch.manual_seed(3)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": 400})).eval()
  sd = {k: v.contiguous() for k, v in llama.state_dict().items()}
  sd["model.mm_projector.weight"] = torch.randn(64, TINY_CLIP["hidden_size"])
  sd["model.mm_projector.bias"] = torch.zeros(64)
  os.makedirs(tmp_path / "llava")
  save_file(sd, tmp_path / "llava" / "model.safetensors")
  with open(tmp_path / "llava" / "config.json", "w") as f:
    json.dump({**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "mm_vision_select_layer": -2, "im_patch_token": 400}, f)
  # SD-style folder: a 4-channel UNet and the VAE.
  unet4 = diffusers.UNet2DConditionModel.from_config({**unet_t.config, "in_channels": 4})
  unet4.save_pretrained(tmp_path / "sd" / "unet")
  vae_t.save_pretrained(tmp_path / "sd" / "vae")
  c = ipr2pr.get_config()
  c.model.dtype = c.model.frozen_dtype = "float32"
  c.model.remat = "none"
  c.model.edit_head = {k: v for k, v in dataclasses.asdict(HEAD).items() if k not in ("dtype", "param_dtype")}
  c.pretrained.llava, c.pretrained.vision_tower, c.pretrained.sd = str(tmp_path / "llava"), clip_dir[0], str(tmp_path / "sd")
  c.train.min_snr_gamma = 5.0
  tok = LlamaTokenizer.from_pretrained(sp_dir)
  model = model_lib.build(c, tok).host_model
  # The recipe's loss options reach the model as on the random-init path.
  assert (model.config.min_snr_gamma, model.config.ins_loss_weight, model.config.edit_loss_weight) == (5.0, 1.0, 0.5)
  emb = np.asarray(model.mllm.language_model.model.embed_tokens.embedding[...])
  assert emb.shape == (len(tok), 64) == (411, 64)
  np.testing.assert_array_equal(emb[:400], sd["model.embed_tokens.weight"].numpy())
  assert 0.01 < emb[400:].std() < 0.03                       # new rows ~ N(0, 0.02)
  assert model.mllm.language_model.lm_head.kernel.shape == (64, 411)
  assert model.unet.config.in_channels == 8 and model.config.img_token_id == tok.token_to_id("[IMG0]")
  assert (np.asarray(model.unet.conv_in.kernel[...])[:, :, 4:] == 0).all()
  assert model.mllm.config.layout == "v1" and model.mllm.config.image_token_id == 400
