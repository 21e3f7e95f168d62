"""Peak host memory of `python -m mgie_jax.export` on a mid-size MGIE trained from pretrained
folders (random weights written with transformers / diffusers: LLaVA v1 + CLIP + an SD-style
UNet/VAE), against the size of what it writes.

  python benchmarks/bench_export.py [--width 1024 --layers 8] [--formats mgie,llava-v1,llava-hf,diffusers]

Runs twice: the given LLaMA, and one with twice the layers at ~1/sqrt(2) the width (about the
same bytes, twice the tensors): the peak should follow the largest tensors and the trained
modules restored from the checkpoint, not the number of tensors. Prints peak RSS of the export
process (VmHWM), the RSS of the same process right after start-up (imports, config), the
checkpoint's trained bytes (fp32) and the bytes written.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(root, width, layers, vocab_pieces=1000):
  """Pretrained folders (random weights), then a 1-step checkpoint of configs/ipr2pr.py on them."""
  import diffusers
  import torch
  import transformers
  from data_pipelines import synthetic
  synthetic.train_tokenizer(f"{root}/tok", [f"edit number {i} of the picture" for i in range(200)], vocab_pieces)
  from mgie_jax.text import LlamaTokenizer
  tok = LlamaTokenizer.from_pretrained(f"{root}/tok")
  base = tok.sp.get_piece_size()
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=base, hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
      num_attention_heads=width // 64, max_position_embeddings=512)).eval()
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
      patch_size=14)).eval()
  clip.save_pretrained(f"{root}/clip")
  sd = {k: v.contiguous() for k, v in llama.state_dict().items()}
  sd["model.mm_projector.weight"] = torch.randn(width, 256) * 0.02
  sd["model.mm_projector.bias"] = torch.zeros(width)
  os.makedirs(f"{root}/llava", exist_ok=True)
  from safetensors.torch import save_file
  save_file(sd, f"{root}/llava/model.safetensors")
  with open(f"{root}/llava/config.json", "w") as f:
    json.dump({**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
               "mm_vision_select_layer": -2, "mm_vision_tower": f"{root}/clip", "im_patch_token": base}, f)
  import shutil
  for name in os.listdir(f"{root}/tok"):
    shutil.copy(f"{root}/tok/{name}", f"{root}/llava/{name}")
  unet = diffusers.UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4,
                                        block_out_channels=(128, 256, 256), layers_per_block=2,
                                        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
                                        cross_attention_dim=768, attention_head_dim=8)
  unet.save_pretrained(f"{root}/sd/unet")
  vae = diffusers.AutoencoderKL(block_out_channels=(64, 128), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
  vae.save_pretrained(f"{root}/sd/vae")
  del llama, clip, unet, vae, sd
  import jax
  from configs import ipr2pr
  from mgie_jax.training.checkpoint import Checkpointer
  from mgie_jax.training.setup import make_setup
  c = ipr2pr.get_config()
  c.model.dtype = c.model.frozen_dtype = "float32"
  c.model.remat = "none"
  c.model.edit_head.llm_dim = width
  c.pretrained.update(llava=f"{root}/llava", vision_tower=f"{root}/clip", sd=f"{root}/sd")
  c.data.tokenizer = f"{root}/llava"
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1], workdir=f"{root}/run")
  state, _ = run.new_state()
  trained = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state.params))
  ckpt = Checkpointer(f"{root}/run", every=1, keep=1, async_save=False)
  ckpt.save(1, state, None, json.loads(c.to_json_best_effort()), force=True)
  ckpt.close()
  return trained


def measure(root, formats):
  out = f"{root}/export"
  # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss over exec (this script's models).
  probe = ("import runpy, sys; sys.argv = ['x'] + sys.argv[1:]; "
           "import torch, mgie_jax.convert.writers\n"
           "hwm = lambda: next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
           "print('startup_kb', hwm(), flush=True)\n"
           "try:\n  runpy.run_module('mgie_jax.export', run_name='__main__')\n"
           "finally:\n  print('peak_kb', hwm(), flush=True)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", probe, f"--workdir={root}/run", f"--out={out}",
                        f"--format={formats}", "--dtype=float16"], cwd=ROOT, env=env, capture_output=True, text=True)
  if "peak_kb" not in res.stdout or res.returncode:
    raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
  get = lambda name: int(next(l.split()[1] for l in res.stdout.splitlines() if l.startswith(name)))
  written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  return get("peak_kb"), get("startup_kb"), written


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--formats", default="mgie,llava-v1,llava-hf,diffusers")
  a = p.parse_args()
  wide = (a.width, a.layers)
  deep = (int(round(a.width / 2 ** 0.5 / 64)) * 64, 2 * a.layers)
  print(f"{'model':28s} {'tensors x2?':>10s} {'trained MB':>10s} {'written MB':>10s} {'startup MB':>10s} "
        f"{'peak MB':>8s} {'peak-startup':>12s}")
  for label, (width, layers) in (("LLaMA %dx%d" % wide, wide), ("LLaMA %dx%d" % deep, deep)):
    with tempfile.TemporaryDirectory() as root:
      trained = make_run(root, width, layers)
      peak, startup, written = measure(root, a.formats)
      print(f"{label:28s} {'yes' if layers != a.layers else 'no':>10s} {trained / 2**20:10.0f} "
            f"{written / 2**20:10.0f} {startup / 1024:10.0f} {peak / 1024:8.0f} {(peak - startup) / 1024:12.0f}",
            flush=True)


if __name__ == "__main__":
  main()
