"""MGIE on LLaVA-1.5 (configs/ipr2pr_llava15.py, at toy size configs/tiny_llava15.py): a generated
tiny llava-hf LLaVA-1.5 folder (two-layer GELU projector, <image> and <pad> added tokens, the
vocabulary padded past them) and a tiny SD folder train, edit and export with the commands; our
MLLM and the llava-hf export both equal transformers' LlavaForConditionalGeneration on a LLaVA-1.5
prompt (1e-4 x max(1, |ref|))."""

import json
import os
import shutil
import subprocess
import sys

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import ORIGINAL_XLA_FLAGS, TINY_CLIP, TINY_LLAMA, max_err, tol, xla_flags
from mgie_jax.convert import from_pretrained
from mgie_jax.models import LlavaForConditionalGeneration
from mgie_jax.text import IMG_TOKENS, LlamaTokenizer, TEMPLATES, check_image_tokens, prompt_text, training_example

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMG = 16        # (28 / 7)^2 patches, CLS dropped


def env():
  return dict(os.environ, XLA_FLAGS=xla_flags(1, ORIGINAL_XLA_FLAGS),
              PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(*argv):
  p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


@pytest.fixture(scope="module")
def folders(run_data, tmp_path_factory):
  """A tiny llava-hf LLaVA-1.5 folder on the synthetic data's SentencePiece model, and a tiny SD folder."""
  root = tmp_path_factory.mktemp("llava15")
  llava = root / "llava-1.5"
  os.makedirs(llava)
  shutil.copyfile(os.path.join(run_data[1], "tokenizer.model"), llava / "tokenizer.model")
  pieces = LlamaTokenizer(str(llava / "tokenizer.model")).sp.get_piece_size()
  added = {"<image>": pieces, "<pad>": pieces + 1}
  with open(llava / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True} for t, i in added.items()}}, f)
  torch.manual_seed(5)
  cfg = transformers.LlavaConfig(vision_config={**TINY_CLIP, "model_type": "clip_vision_model"},
                                 text_config={**TINY_LLAMA, "model_type": "llama", "vocab_size": pieces + 32},
                                 image_token_id=pieces, vision_feature_layer=-2, projector_hidden_act="gelu",
                                 image_seq_length=N_IMG)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  model.save_pretrained(llava)
  sd = root / "sd"
  diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).save_pretrained(sd / "unet")
  diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                          norm_num_groups=8).save_pretrained(sd / "vae")
  return dict(root=root, llava=str(llava), sd=str(sd), model=model, pieces=pieces)


def a_prompt(tok, n=N_IMG):
  ex = training_example(tok, "make the square blue", "Paint the square a deep blue.", num_image_tokens=n,
                        template="llava_1_5")
  return np.asarray(ex.input_ids)[None]


def test_the_llava15_prompt_puts_the_image_first_as_image_tokens(folders):
  tok = LlamaTokenizer.from_pretrained(folders["llava"])
  assert tok.token_to_id("<image>") == folders["pieces"] and tok.token_to_id("[IMG0]") == folders["pieces"] + 5
  text = prompt_text("make it blue", 3, "llava_1_5")
  assert text.endswith("USER: <image><image><image>\nwhat will this image be like if 'make it blue' ASSISTANT:")
  ids = a_prompt(tok)
  check_image_tokens(ids, tok.token_to_id(TEMPLATES["llava_1_5"].image_token), N_IMG)
  assert tok.token_to_id("<im_start>") not in ids[0]


def test_our_llava15_mllm_matches_transformers(folders):
  tok = LlamaTokenizer.from_pretrained(folders["llava"])
  ours = from_pretrained(LlavaForConditionalGeneration, folders["llava"])
  assert ours.config.projector == "mlp2x_gelu" and ours.config.num_image_tokens == N_IMG
  ids = a_prompt(tok)
  px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = folders["model"](input_ids=torch.as_tensor(ids), pixel_values=px).logits.numpy()
  got = ours(jnp.asarray(ids), jnp.asarray(px.numpy().transpose(0, 2, 3, 1))).logits
  assert max_err(got, ref) <= tol(ref)


def test_a_tiny_llava15_run_trains_edits_and_exports(folders, run_data, tmp_path):
  work = str(tmp_path / "run")
  common = ["--config=configs/tiny_llava15.py", f"--config.pretrained.llava={folders['llava']}",
            f"--config.pretrained.sd={folders['sd']}", f"--config.data.dir={run_data[0]}"]
  run("mgie_jax.train", *common, f"--workdir={work}")
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
  assert rows[-1]["no_img"] == 0             # every row held its [IMG] window after 16 <image> tokens
  image = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)).save(image)
  p = run("mgie_jax.edit", f"--workdir={work}", f"--image={image}", "--instruction=make the square blue",
          f"--out={tmp_path / 'out.png'}", "--steps=3", "--max_new_tokens=6", "--resolution=32")
  assert "expressive instruction:" in p.stdout and Image.open(tmp_path / "out.png").size == (56, 40)
  out = tmp_path / "export"
  run("mgie_jax.export", f"--workdir={work}", f"--out={out}", "--format=mgie,llava-hf,diffusers", "--dtype=float32")
  # The export is LLaVA-1.5 again: transformers loads it and reads <image> tokens; its logits are the
  # trained MLLM's (ours loaded from the export) to 1e-4.
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(out / "llava-hf")).eval()
  assert hf.config.image_token_id == folders["pieces"] and hf.config.projector_hidden_act == "gelu"
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out / "llava-hf"))
  assert hf_tok.convert_tokens_to_ids(["<image>", "<pad>", *IMG_TOKENS]) == list(
      range(folders["pieces"], folders["pieces"] + 2)) + list(range(folders["pieces"] + 5, folders["pieces"] + 13))
  assert json.load(open(out / "mgie" / "edit_head.json"))["template"] == "llava_1_5"
  ids = a_prompt(LlamaTokenizer.from_pretrained(folders["llava"]))
  px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(ids), pixel_values=px).logits.numpy()
  ours = from_pretrained(LlavaForConditionalGeneration, str(out / "llava-hf"))
  got = ours(jnp.asarray(ids), jnp.asarray(px.numpy().transpose(0, 2, 3, 1))).logits
  assert max_err(got, ref) <= tol(ref)
  # Training changed the trained set (embed_tokens), not the frozen LLaMA layers.
  base = folders["model"].state_dict()
  trained = hf.state_dict()
  emb = [k for k in trained if k.endswith("embed_tokens.weight")][0]
  q = [k for k in trained if k.endswith("layers.0.self_attn.q_proj.weight")][0]
  assert not torch.equal(trained[emb], base[emb]) and torch.equal(trained[q], base[q])
