"""Export to PyTorch: the official layout (mllm.pt / unet.pt), LLaVA v1 and llava-hf folders and an
InstructPix2Pix pipeline, each loaded by its PyTorch consumer and compared with our model (fp32,
1e-4 x max(1, |ref|)); an edit through the exported PyTorch pieces equals ours; a checkpoint
written on 8 devices exports the same bytes; the released-weights path (configs/ipr2pr.py with
mllm_pt / unet_pt) loads those files back bit for bit."""

import json
import os
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conftest import ORIGINAL_XLA_FLAGS, max_err, tol, xla_flags
from test_mgie import EditMapper     # the official edit head, as the release writes it
from configs import tiny
from data_pipelines import synthetic
from mgie_jax.convert import from_pretrained
from mgie_jax.run.workdir import TrainedSource
from mgie_jax.convert.writers import write_diffusers, write_llava_hf, write_llava_v1, write_mgie
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import make_setup

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.float32


def tiny_config(tok_dir):
  c = tiny.get_config()
  c.data.tokenizer = tok_dir
  c.pretrained.vae = ""
  c.train.ema_decay = 0.0                        # export reads state.params (the EMA: test_train)
  c.model.noise.prediction_type = "epsilon"      # diffusers' InstructPix2Pix default
  c.model.noise.rescale_betas_zero_snr = False
  return c


def save_run(c, workdir, devices, perturb=0.05):
  """A checkpoint whose trained parameters differ from their initialisation (as after training)."""
  run = make_setup(c, c.data.tokenizer, devices=devices)
  state, _ = run.new_state()
  noise = jax.tree.map(lambda x: perturb * jax.random.normal(jax.random.key(7), x.shape, x.dtype), state.params)
  state = state.replace(params=jax.tree.map(jnp.add, state.params, noise))
  ckpt = Checkpointer(workdir, every=1, keep=2, async_save=False)
  ckpt.save(5, state, None, json.loads(c.to_json_best_effort()), force=True)
  ckpt.close()
  return run, state


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  synthetic.train_tokenizer(str(root / "tok"), ["make the square blue", "the red square becomes blue."] * 50)
  c = tiny_config(str(root / "tok"))
  run, state = save_run(c, str(root / "run"), jax.devices()[:1])
  source = TrainedSource(str(root / "run"), 5)
  out = root / "out"
  write_mgie(source, str(out / "mgie"), F32)
  write_llava_v1(source, str(out / "llava-v1"), F32, max_shard_bytes=200_000)
  write_llava_hf(source, str(out / "llava-hf"), F32)
  write_diffusers(source, str(out / "diffusers"), F32)
  model = run.model(state.params, run.frozen())
  return root, out, c, run, model


def test_mllm_pt_and_unet_pt_have_the_official_layout(exported):
  root, out, c, run, model = exported
  mllm = torch.load(out / "mgie" / "mllm.pt", weights_only=True)
  head = EditMapper(run.mcfg.edit_head)
  official = {"edit_head." + k: tuple(v.shape) for k, v in head.state_dict().items()}
  vocab, d = len(run.tok), run.mcfg.llava.text.hidden_size
  official.update({"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "emb": (1, 8, d)})
  assert {k: tuple(v.shape) for k, v in mllm.items()} == official
  head.load_state_dict({k[len("edit_head."):]: v for k, v in mllm.items() if k.startswith("edit_head.")}, strict=True)
  h = np.random.default_rng(0).normal(size=(2, 8, d)).astype(F32)
  with torch.no_grad():
    want = head.eval()(torch.as_tensor(h), mllm["emb"]).numpy()
  got = np.asarray(model.edit_head(jnp.asarray(h), jnp.asarray(mllm["emb"].numpy())))
  assert max_err(got, want) <= tol(want)
  img0 = run.mcfg.img_token_id
  np.testing.assert_array_equal(mllm["emb"][0].numpy(), np.asarray(model.img_embeddings()))
  np.testing.assert_array_equal(mllm["model.embed_tokens.weight"].numpy()[img0:img0 + 8], np.asarray(model.img_embeddings()))
  # unet.pt loads strictly into a diffusers UNet with 8 input channels and computes what ours does.
  cfg = json.load(open(out / "diffusers" / "unet" / "config.json"))
  unet = diffusers.UNet2DConditionModel.from_config(cfg).eval()
  unet.load_state_dict(torch.load(out / "mgie" / "unet.pt", weights_only=True), strict=True)
  assert unet.config.in_channels == 8
  rng = np.random.default_rng(1)
  x, ctx = rng.normal(size=(2, 8, 16, 16)).astype(F32), rng.normal(size=(2, 77, 32)).astype(F32)
  with torch.no_grad():
    want = unet(torch.as_tensor(x), torch.tensor([10, 700]), encoder_hidden_states=torch.as_tensor(ctx)).sample.numpy()
  got = np.asarray(model.unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray([10, 700]), jnp.asarray(ctx)))
  assert max_err(got.transpose(0, 3, 1, 2), want) <= tol(want)


def flat(module):
  from flax import nnx
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_llava_v1_folder_round_trips_bit_for_bit(exported):
  from mgie_jax.models import LlavaForConditionalGeneration
  from mgie_jax.text import LlamaTokenizer
  root, out, c, run, model = exported
  folder = out / "llava-v1"
  assert os.path.exists(folder / "model.safetensors.index.json")            # sharded, with an index
  cfg = json.load(open(folder / "config.json"))
  assert cfg["mm_vision_tower"] == str(folder / "clip") and cfg["mm_use_im_start_end"] and cfg["use_mm_proj"]
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, -1)
  ours = from_pretrained(LlavaForConditionalGeneration, str(folder))       # CLIP found through mm_vision_tower
  a, b = flat(model.mllm), flat(ours)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  tok = LlamaTokenizer.from_pretrained(str(folder))
  assert {t: tok.token_to_id(t) for t in ("<im_patch>", "<im_start>", "<im_end>", "[IMG0]", "[IMG7]")} == \
      {t: run.tok.token_to_id(t) for t in ("<im_patch>", "<im_start>", "<im_end>", "[IMG0]", "[IMG7]")}
  with open(folder / "tokenizer.model", "rb") as f, open(run.tok.model_file, "rb") as g:
    assert f.read() == g.read()
  # The official code is a LlamaForCausalLM with an mm_projector: the LLaMA weights load as they are.
  tensors = {}
  for name in json.load(open(folder / "model.safetensors.index.json"))["weight_map"].values():
    tensors.update(load_file(str(folder / name)))
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("mm_")})).eval()
  missing, unexpected = llama.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
  assert not missing and sorted(unexpected) == ["model.mm_projector.bias", "model.mm_projector.weight"]
  ids = np.random.default_rng(2).integers(3, run.mcfg.llava.text.vocab_size, (2, 12))
  with torch.no_grad():
    want = llama(torch.as_tensor(ids)).logits.numpy()
  got = np.asarray(model.mllm.language_model(jnp.asarray(ids)).logits)
  assert max_err(got, want) <= tol(want)


def test_an_edit_through_the_exported_pytorch_model_equals_ours(exported, monkeypatch):
  """transformers LLaVA (llava-hf export) writes the same expressive text; the official edit head
  (mllm.pt) gives the same condition; the diffusers pipeline (diffusers export) the same image."""
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.diffusion import edit_images, make_sampler
  from mgie_jax.text import IMG_TOKENS, img_window_start, prompt_text
  root, out, c, run, model = exported
  from PIL import Image
  photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 40, 3), np.uint8))
  pixels, clip = inference.prepare([photo], 32, 28)
  texts, cond, null = inference.expressive_instructions(model, run.tok, clip, ["make the square blue"],
                                                        max_new_tokens=12)
  # (a) the expressive instruction from transformers' LLaVA
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(out / "llava-hf")).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "llava-hf"))
  prompt = prompt_text("make the square blue", run.mcfg.llava.num_image_tokens)
  ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
  assert ids[0].tolist() == run.tok.encode(prompt)
  pix = torch.as_tensor(clip.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    gen = hf.generate(input_ids=ids, pixel_values=pix, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=3,
                      eos_token_id=run.tok.eos_id, pad_token_id=0)
  new = gen[0, ids.shape[1]:].tolist()
  stop = {run.tok.eos_id, run.tok.token_to_id("[IMG0]")}
  new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]
  assert run.tok.decode(new) == texts[0]
  # (b) the condition from the official edit head on transformers' hidden states
  full = torch.as_tensor([run.tok.encode(prompt) + new + [run.tok.token_to_id(t) for t in IMG_TOKENS]])
  with torch.no_grad():
    hidden = hf(input_ids=full, pixel_values=pix, output_hidden_states=True).hidden_states[-1]
  start = int(img_window_start(full.numpy(), run.mcfg.img_token_id)[0])
  mllm = torch.load(out / "mgie" / "mllm.pt", weights_only=True)
  head = EditMapper(run.mcfg.edit_head)
  head.load_state_dict({k[len("edit_head."):]: v for k, v in mllm.items() if k.startswith("edit_head.")})
  with torch.no_grad():
    t_cond = head.eval()(hidden[:, start:start + 8], mllm["emb"]).numpy()
    t_null = head(torch.zeros(1, 8, hidden.shape[-1]), mllm["emb"]).numpy()
  assert max_err(t_cond, cond) <= tol(cond) and max_err(t_null, null) <= tol(null)
  # (c) the image from the diffusers pipeline, same latents and noise
  steps = 6
  rng = np.random.default_rng(4)
  latents = rng.normal(size=(1, 4, 16, 16)).astype(F32)
  noises = [torch.as_tensor(rng.normal(size=(1, 4, 16, 16)).astype(F32)) for _ in range(steps)]
  queue = list(noises)
  monkeypatch.setattr(euler_a, "randn_tensor", lambda *a, **k: queue.pop(0))
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      str(out / "diffusers"), text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  image = torch.as_tensor(pixels.transpose(0, 3, 1, 2).copy())
  want = pipe(image=image, prompt_embeds=torch.as_tensor(t_cond), negative_prompt_embeds=torch.as_tensor(t_null),
              latents=torch.as_tensor(latents), num_inference_steps=steps, guidance_scale=4.0, image_guidance_scale=1.5,
              output_type="np").images[0]
  sampler = make_sampler(inference.default_sampler(model), steps)
  got = edit_images(model.unet, model.vae, sampler, jnp.asarray(pixels), cond, null,
                    latents=jnp.asarray(latents.transpose(0, 2, 3, 1)),
                    noise=jnp.asarray(np.stack([n.numpy().transpose(0, 2, 3, 1) for n in noises])),
                    text_scale=4.0, image_scale=1.5)
  assert max_err(np.asarray(got)[0], want) <= 1e-3, "edited images differ"


def test_export_from_an_eight_device_checkpoint_equals_one_device(tmp_path, exported):
  root, out, c, run, model = exported
  c8 = tiny_config(c.data.tokenizer)
  c8.mesh = dict(data=1, fsdp=8, tensor=1)
  save_run(c8, str(tmp_path / "run8"), jax.devices("cpu")[:8])
  a8 = TrainedSource(str(tmp_path / "run8"), 5)
  write_mgie(a8, str(tmp_path / "mgie8"), F32)
  for name in ("mllm.pt", "unet.pt"):
    one, eight = (torch.load(p / name, weights_only=True) for p in (out / "mgie", tmp_path / "mgie8"))
    assert one.keys() == eight.keys() and all(torch.equal(one[k], eight[k]) for k in one), name


def test_released_weights_path_loads_the_official_files_back(exported, tmp_path):
  """configs/ipr2pr.py on tiny files in the official layout: stock LLaVA v1 + CLIP, an
  InstructPix2Pix folder, mllm.pt and unet.pt; every parameter comes back exactly."""
  from configs import ipr2pr
  root, out, c, run, model = exported
  rc = ipr2pr.get_config()
  rc.model.dtype = rc.model.frozen_dtype = "float32"
  rc.model.remat = "none"
  rc.model.edit_head = dict(c.model.edit_head)
  rc.pretrained.update(llava=str(out / "llava-v1"), sd=str(out / "diffusers"),
                       mllm_pt=str(out / "mgie" / "mllm.pt"), unet_pt=str(out / "mgie" / "unet.pt"))
  rc.data.tokenizer = str(out / "llava-v1")
  rc.model.noise = {}
  loaded = make_setup(rc, rc.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = loaded.new_state()
  again = loaded.model(state.params, frozen)
  a, b = flat(model), flat(again)
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  assert again.config.noise.prediction_type == "epsilon"        # read from scheduler_config.json


def test_export_command(exported, tmp_path):
  root, out, c, run, model = exported
  env = dict(os.environ, XLA_FLAGS=xla_flags(1, ORIGINAL_XLA_FLAGS))
  cmd = [sys.executable, "-m", "mgie_jax.export", f"--workdir={root / 'run'}", f"--out={tmp_path / 'x'}"]
  res = subprocess.run(cmd + ["--format=mgie,diffusers"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "x")) == ["diffusers", "mgie"]
  a = torch.load(tmp_path / "x" / "mgie" / "unet.pt", weights_only=True)
  assert all(v.dtype == torch.float16 for v in a.values())
  again = subprocess.run(cmd + ["--format=mgie"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
  bad = subprocess.run(cmd + ["--format=onnx"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "unknown format(s) onnx" in bad.stderr


PYTORCH_EDIT = """
import json, sys
import numpy as np
from PIL import Image
from mgie_jax.inference.pytorch_pipeline import MGIEPipeline
out, work = sys.argv[1], sys.argv[2]
pipe = MGIEPipeline.from_export(out)
noise = np.load(work + "/noise.npy")
image, text = pipe.edit(Image.open(work + "/photo.png"), "make the square blue", resolution=32, steps=4,
                        text_scale=4.0, image_scale=1.5, max_new_tokens=12, latents=np.load(work + "/latents.npy"),
                        noise=[n for n in noise], output_type="np")
np.save(work + "/edited.npy", image)
json.dump({"text": text, "jax_imported": "jax" in sys.modules}, open(work + "/text.json", "w"))
"""


def test_the_pytorch_side_edit_equals_ours(exported, tmp_path):
  """mgie_jax.inference.pytorch_pipeline (torch, transformers, diffusers; no JAX in its process) on the exports
  gives our edit's expressive text and image, from the noise our edit drew for its key."""
  from PIL import Image
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.diffusion import draw_noise, edit_images, make_sampler
  root, out, c, run, model = exported
  photo = Image.fromarray(np.random.default_rng(5).integers(0, 255, (30, 44, 3), np.uint8))
  photo.save(tmp_path / "photo.png")
  pixels, clip = inference.prepare([photo], 32, run.mcfg.llava.vision.image_size)
  texts, cond, null = inference.expressive_instructions(model, run.tok, clip, ["make the square blue"],
                                                        max_new_tokens=12)
  sampler = make_sampler(inference.default_sampler(model), 4)
  latents, noise = draw_noise(jax.random.key(0), sampler, (1, 16, 16, 4))
  want = np.asarray(edit_images(model.unet, model.vae, sampler, jnp.asarray(pixels), cond, null, key=jax.random.key(0),
                                text_scale=4.0, image_scale=1.5))[0]
  np.save(tmp_path / "latents.npy", np.asarray(latents).transpose(0, 3, 1, 2))
  np.save(tmp_path / "noise.npy", np.asarray(noise).transpose(0, 1, 4, 2, 3))
  e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", PYTORCH_EDIT, str(out), str(tmp_path)], env=e, cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(tmp_path / "text.json"))
  assert not result["jax_imported"]
  assert result["text"] == texts[0]
  got = np.load(tmp_path / "edited.npy")
  assert got.shape == want.shape and max_err(got, want) <= 1e-4, max_err(got, want)


LOAD_ALL_THREE = """
import sys
import diffusers, flax, transformers
out = sys.argv[1]
transformers.LlavaForConditionalGeneration.from_pretrained(out + "/llava-hf")
diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
    out + "/diffusers", text_encoder=None, tokenizer=None, safety_checker=None, requires_safety_checker=False)
from mgie_jax.models import LlavaForConditionalGeneration
from mgie_jax.convert import from_pretrained
flax.config.update("flax_always_shard_variable", True)   # flax's default: ours must not depend on it
from_pretrained(LlavaForConditionalGeneration, out + "/llava-v1")
print("loaded")
"""


def test_the_three_exports_load_in_one_process_outside_the_checkout(exported, tmp_path):
  """transformers' llava-hf, diffusers' pipeline, then our llava-v1 loader, in one user script run
  from a folder of the user's: our parameters do not depend on flax's process-wide eager-sharding
  setting (which flax defaults to on, and which importing mgie_jax used to turn off)."""
  out = exported[1]
  e = dict(os.environ)
  e.pop("PYTHONPATH", None)                     # installed as the README says, not from the checkout
  proc = subprocess.run([sys.executable, "-c", LOAD_ALL_THREE, str(out)], env=e, cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
