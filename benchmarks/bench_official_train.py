"""One training step: the official MGIE PyTorch code against ours, same release-format files, same batch.

  git clone https://github.com/apple/ml-mgie /tmp/ml-mgie        # the official code, used as is
  python benchmarks/bench_official_train.py --official=/tmp/ml-mgie [--layers=2 --batch=4]

The files (written into a temporary folder, random weights): a LLaVA v1 folder holding a LLaMA at
width 4096 (the official edit head and its dummy image features hard-code 4096 and a 1024-wide
CLIP) with `--layers` layers and LLaMA's 32,000-token vocabulary, a 1024-wide CLIP tower, a small
SD-shaped UNet and VAE; then the release's `mllm.pt` (embed_tokens and lm_head grown to 32,011
rows, the full-size edit head) and `unet.pt` (8 input channels), written from the official
model's own weights.

Official: `mgie_llava.LlavaLlamaForCausalLM` from the checkout, built on those folders (its hub
loads of SD-1.5 pointed at the local folder; the two registrations transformers 5 refuses are
skipped), trained set as `mgie_train.py` sets it (embed_tokens, lm_head, edit_head, unet), its
own joint loss, fp32, torch on every core, `torch.optim.AdamW`. Ours: `configs/ipr2pr.py` on the
same folders and release files at fp32, the trainer's compiled step (forward, backward, Adam
update, donation). Both take the same token ids, CLIP view and images; the first step's token
loss must agree (the diffusion term draws its own noise on each side). Prints seconds per step
(median of --repeats after a warm-up) and official/ours; --profile writes a JAX trace of one of
our steps (TensorBoard's profile plugin or Perfetto read it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import same_pages_as_the_commands  # noqa: E402

same_pages_as_the_commands()

VOCAB, WIDTH, CLIP_WIDTH, CLIP_SIZE, PATCH = 32000, 4096, 1024, 28, 14
IMG0 = VOCAB + 3                       # after <im_patch>, <im_start>, <im_end>: as the release


def write_tokenizer(folder: str) -> None:
  """A SentencePiece model with LLaMA's 32,000 ids: a small trained BPE padded with unused pieces."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb
  rng = np.random.default_rng(0)
  words = "make it blue red green circle square the at top left of a an image sky USER ASSISTANT".split()
  sents = [" ".join(rng.choice(words, 10)) + "." for _ in range(2000)]
  prefix = os.path.join(folder, "small")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=prefix, vocab_size=300,
                                 model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                 character_coverage=1.0, minloglevel=2)
  m = pb.ModelProto()
  m.ParseFromString(open(prefix + ".model", "rb").read())
  for i in range(len(m.pieces), VOCAB):
    m.pieces.add(piece=f"<unused{i}>", score=-1e4, type=pb.ModelProto.SentencePiece.USER_DEFINED)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(m.SerializeToString())
  os.remove(prefix + ".model")
  os.remove(prefix + ".vocab")


def write_files(root: str, layers: int) -> dict:
  """The folders and release files both sides load; returns their paths."""
  import diffusers
  import torch
  import transformers
  from safetensors.torch import save_file
  torch.manual_seed(0)
  p = {k: os.path.join(root, k) for k in ("llava", "clip", "sd")}
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=CLIP_WIDTH, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=16,
      image_size=CLIP_SIZE, patch_size=PATCH))
  clip.save_pretrained(p["clip"])
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=11008, num_hidden_layers=layers,
      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6))
  sd = {k: v.contiguous() for k, v in llama.state_dict().items()}
  sd["model.mm_projector.weight"] = torch.randn(WIDTH, CLIP_WIDTH) * 0.02
  sd["model.mm_projector.bias"] = torch.zeros(WIDTH)
  os.makedirs(p["llava"])
  save_file(sd, os.path.join(p["llava"], "model.safetensors"))
  with open(os.path.join(p["llava"], "config.json"), "w") as f:
    json.dump({**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "mm_vision_tower": p["clip"], "mm_hidden_size": CLIP_WIDTH, "mm_vision_select_layer": -2,
               "use_mm_proj": True, "im_patch_token": VOCAB}, f)
  write_tokenizer(p["llava"])
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
  unet.save_pretrained(os.path.join(p["sd"], "unet"))
  diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                          norm_num_groups=32).save_pretrained(os.path.join(p["sd"], "vae"))
  diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012).save_pretrained(os.path.join(p["sd"], "scheduler"))
  return p


def load_official(checkout: str, p: dict):
  """The official model class on the folders, grown to MGIE's vocabulary, trained set as
  mgie_train.py sets it."""
  import diffusers
  import torch
  import transformers
  from safetensors.torch import load_file
  os.environ.setdefault("LOCAL_RANK", "0")             # its loss prints on rank 0
  for cls in (diffusers.DDPMScheduler, diffusers.AutoencoderKL, diffusers.UNet2DConditionModel):
    hub_load = cls.from_pretrained.__func__
    cls.from_pretrained = classmethod(   # its __init__ loads SD-1.5 from the hub: the local folder instead
        lambda c, name, *a, _load=hub_load, **k: _load(c, p["sd"] if name == "runwayml/stable-diffusion-v1-5"
                                                       else name, *a, **k))
  # transformers 5 ships its own "llava" model type and refuses a second registration.
  transformers.AutoConfig.register = staticmethod(lambda *a, **k: None)
  transformers.AutoModelForCausalLM.register = staticmethod(lambda *a, **k: None)
  sys.path.insert(0, checkout)
  import mgie_llava
  with open(os.path.join(p["llava"], "config.json")) as f:
    cfg = json.load(f)
  model = mgie_llava.LlavaLlamaForCausalLM(mgie_llava.LlavaConfig(**cfg))
  missing, unexpected = model.load_state_dict(load_file(os.path.join(p["llava"], "model.safetensors")), strict=False)
  assert not unexpected and all(k.startswith(("edit_head.", "unet.", "vae.")) for k in missing), missing[:5]
  model.resize_token_embeddings(VOCAB + 11)                # + <im_patch> <im_start> <im_end> [IMG0..7]
  vision = model.get_vision_tower().config
  vision.use_im_start_end, vision.im_patch_token = False, VOCAB
  for n, q in model.named_parameters():
    q.requires_grad = any(k in n for k in ("embed_tokens", "lm_head", "edit_head", "unet"))
  return model


def write_release(model, folder: str) -> dict:
  """mllm.pt and unet.pt in the release's layout, from the official model's own weights."""
  import torch
  sd = model.state_dict()
  emb = sd["model.embed_tokens.weight"]
  mllm = {"model.embed_tokens.weight": emb, "lm_head.weight": sd["lm_head.weight"], "emb": emb[-8:][None]}
  mllm.update({k: v for k, v in sd.items() if k.startswith("edit_head.")})
  os.makedirs(folder, exist_ok=True)
  out = {"mllm_pt": os.path.join(folder, "mllm.pt"), "unet_pt": os.path.join(folder, "unet.pt")}
  torch.save({k: v.contiguous() for k, v in mllm.items()}, out["mllm_pt"])
  torch.save(model.unet.state_dict(), out["unet_pt"])
  return out


def make_batch(batch: int, length: int, resolution: int, seed: int = 0) -> dict:
  """Token ids with the image patches after a short prompt, an expressive instruction, then the
  8 visual tokens last (the official code finds them by id 32003, or else at the end: both agree)."""
  rng = np.random.default_rng(seed)
  n_img = (CLIP_SIZE // PATCH) ** 2
  ids = rng.integers(3, 300, size=(batch, length)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 2:2 + n_img] = VOCAB
  ids[:, -8:] = np.arange(IMG0, IMG0 + 8)
  labels = ids.copy()
  labels[:, :length // 2] = -100
  images = rng.uniform(-1, 1, size=(2, batch, resolution, resolution, 3)).astype(np.float32)
  return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
          "clip_image": rng.normal(size=(batch, CLIP_SIZE, CLIP_SIZE, 3)).astype(np.float32),
          "input_image": images[0], "edited_image": images[1]}


def time_official(model, b: dict, repeats: int, threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  t = lambda x: torch.as_tensor(x)
  nchw = lambda x: t(x.transpose(0, 3, 1, 2).copy())
  args = dict(input_ids=t(b["input_ids"]).long(), labels=t(b["labels"]).long(), attention_mask=t(b["attention_mask"]),
              images=nchw(b["clip_image"]), p2p_inp=nchw(b["input_image"]), p2p_ans=nchw(b["edited_image"]))
  opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
  model.train()

  def step():
    printed, stdout = io.StringIO(), sys.stdout
    sys.stdout = printed                                # it prints both losses every step
    try:
      loss = model(**args).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    finally:
      sys.stdout = stdout
    return float(loss), float(re.search(r"loss_ce: tensor\(([-\d.e]+)", printed.getvalue()).group(1))

  _, ins = step()          # warm-up (allocations, AdamW state); the first loss sees the files' weights
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return {"seconds": statistics.median(times), "ins": ins}


def time_ours(p: dict, release: dict, b: dict, repeats: int, profile: str | None) -> dict:
  import jax
  from configs import ipr2pr
  from mgie_jax.run.batch import batch_spec
  from mgie_jax.training.setup import make_setup
  from mgie_jax.training.step import batch_sharding, jit_train_step
  c = ipr2pr.get_config()
  c.model.update(dtype="float32", frozen_dtype="float32", remat="none")
  c.pretrained.update(llava=p["llava"], vision_tower=p["clip"], sd=p["sd"], **release)
  c.data.update(resolution=b["input_image"].shape[1], max_length=b["input_ids"].shape[1], length_buckets=())
  c.train.batch_size = b["input_ids"].shape[0]
  c.mesh.update(data=1, fsdp=1, tensor=1)
  t0 = time.perf_counter()
  setup = make_setup(c, p["llava"], devices=jax.devices()[:1])
  state, frozen = setup.new_state()
  sh = batch_sharding(setup)
  spec = batch_spec(c, setup.mcfg)
  with jax.set_mesh(setup.mesh):
    step = jit_train_step(setup, c.data.resolution).lower(
        setup.abstract_state(), setup.abstract_frozen(), spec.abstract(c.train.batch_size, sh)).compile()
  compile_s = time.perf_counter() - t0
  batch = {k: jax.device_put(v, sh) for k, v in b.items()}
  state, m = step(state, frozen, batch)                  # warm-up
  ins = float(m["ins"])
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch)
    float(m["loss"])
    times.append(time.perf_counter() - t0)
  if profile:
    from benchmarks.profile_summary import print_summary
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      state, m = step(state, frozen, batch)
      float(m["loss"])
    print_summary(profile, step.as_text())
  return {"seconds": statistics.median(times), "ins": ins, "setup_and_compile": compile_s}


def main():
  a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a.add_argument("--official", required=True, help="a checkout of apple/ml-mgie (its mgie_llava.py)")
  a.add_argument("--layers", type=int, default=2)
  a.add_argument("--batch", type=int, default=4)
  a.add_argument("--length", type=int, default=64, help="tokens per example")
  a.add_argument("--resolution", type=int, default=64)
  a.add_argument("--repeats", type=int, default=3)
  a.add_argument("--profile", default="", help="write a JAX profile of one of our steps here")
  args = a.parse_args()
  if not os.path.exists(os.path.join(args.official, "mgie_llava.py")):
    print(f"error: {args.official} has no mgie_llava.py; give a checkout of apple/ml-mgie", file=sys.stderr)
    sys.exit(2)
  from benchmarks.common import machine
  threads = os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as root:
    p = write_files(root, args.layers)
    official = load_official(os.path.abspath(args.official), p)
    release = write_release(official, os.path.join(root, "release"))
    b = make_batch(args.batch, args.length, args.resolution)
    theirs = time_official(official, b, args.repeats, threads)
    del official
    ours = time_ours(p, release, b, args.repeats, args.profile or None)
  print(f"{machine()}; torch threads {threads}; LLaMA width {WIDTH} x {args.layers} layers, vocab "
        f"{VOCAB + 11}, batch {args.batch} x {args.length} tokens, {args.resolution} px, fp32")
  # The token loss of the first step checks that both ran the same model on the same batch (the
  # diffusion term draws its own noise and timesteps on each side).
  print(f"official (forward, backward, AdamW): {theirs['seconds']:.3f} s/step (first L_ins {theirs['ins']:.5f})")
  print(f"ours (compiled step, Adam):          {ours['seconds']:.3f} s/step (first L_ins {ours['ins']:.5f}; "
        f"setup + compile {ours['setup_and_compile']:.0f} s)")
  print(f"official/ours: {theirs['seconds'] / ours['seconds']:.2f}")


if __name__ == "__main__":
  main()
