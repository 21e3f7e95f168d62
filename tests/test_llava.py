import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import TINY_CLIP, TINY_LLAMA, max_err, tol
from mgie_jax.models import LlavaForConditionalGeneration
from mgie_jax.text import check_image_tokens
from mgie_jax.convert import from_pretrained

IMAGE_TOKEN = 120
N_IMG = 16   # (28 / 7)^2 patches, CLS dropped


def inputs(batch=2, length=24, seed=0):
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(3, 100, (batch, length), generator=g)
  ids[:, 3:3 + N_IMG] = IMAGE_TOKEN
  return ids, torch.randn(batch, 3, 28, 28, generator=g)


def ours_logits(model, ids, px):
  check_image_tokens(ids.numpy(), model.config.image_token_id, model.config.num_image_tokens)
  return model(jnp.asarray(ids.numpy()), jnp.asarray(px.numpy().transpose(0, 2, 3, 1))).logits


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlavaConfig(vision_config={**TINY_CLIP, "model_type": "clip_vision_model"},
                                 text_config={**TINY_LLAMA, "model_type": "llama"},
                                 image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  path = tmp_path_factory.mktemp("llava_hf")
  model.save_pretrained(path)
  return str(path), model


def test_llava_hf_logits_parity(llava_hf_dir):
  path, ref_model = llava_hf_dir
  ours = from_pretrained(LlavaForConditionalGeneration, path)
  assert ours.config.layout == "hf" and ours.config.projector == "mlp2x_gelu"
  ids, px = inputs()
  with torch.no_grad():
    ref = ref_model(input_ids=ids, pixel_values=px).logits.numpy()
  assert max_err(ours_logits(ours, ids, px), ref) <= tol(ref)


def test_llava_hf_both_key_namings_load(llava_hf_dir, tmp_path):
  """transformers writes `language_model.model.*` or `model.language_model.*` depending on version."""
  path, ref_model = llava_hf_dir
  sd = load_file(os.path.join(path, "model.safetensors"))
  renamed = {}
  for k, v in sd.items():
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
      if k.startswith(old):
        k = new + k[len(old):]
        break
    renamed[k] = v
  assert set(renamed) != set(sd)
  save_file(renamed, os.path.join(tmp_path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f, open(os.path.join(tmp_path, "config.json"), "w") as g:
    g.write(f.read())
  a = from_pretrained(LlavaForConditionalGeneration, path)
  b = from_pretrained(LlavaForConditionalGeneration, str(tmp_path))
  ids, px = inputs(seed=1)
  assert max_err(ours_logits(a, ids, px), ours_logits(b, ids, px)) == 0.0


def make_v1_folder(root, clip_dir, *, embed_clip: bool):
  """A LLaVA v1 (MGIE) folder: LLaMA keys + model.mm_projector, CLIP separate or embedded."""
  clip_path, clip_model = clip_dir
  torch.manual_seed(5)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
  projector = torch.nn.Linear(TINY_CLIP["hidden_size"], TINY_LLAMA["hidden_size"])
  sd = {k: v.contiguous() for k, v in llama.state_dict().items()}
  sd["model.mm_projector.weight"] = projector.weight.detach().clone()
  sd["model.mm_projector.bias"] = projector.bias.detach().clone()
  if embed_clip:
    for k, v in clip_model.state_dict().items():
      sd["model.vision_tower.vision_tower.vision_model." + k] = v.contiguous()
  os.makedirs(root, exist_ok=True)
  save_file(sd, os.path.join(root, "model.safetensors"))
  cfg = {**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
         "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_hidden_size": TINY_CLIP["hidden_size"],
         "mm_vision_select_layer": -2, "mm_use_im_start_end": True, "im_patch_token": IMAGE_TOKEN}
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump(cfg, f)
  return llama, projector, clip_model


def v1_reference(llama, projector, clip_model, ids, px):
  """The LLaVA v1 forward written out: CLIP layer -2, CLS dropped, Linear, spliced into embeddings."""
  with torch.no_grad():
    feats = projector(clip_model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
    embeds = llama.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN] = feats.reshape(-1, feats.shape[-1])
    return llama(inputs_embeds=embeds).logits.numpy()


@pytest.mark.parametrize("embed_clip", [False, True])
def test_llava_v1_layout_parity(tmp_path, clip_dir, embed_clip):
  llama, projector, clip_model = make_v1_folder(str(tmp_path), clip_dir, embed_clip=embed_clip)
  ours = from_pretrained(LlavaForConditionalGeneration, str(tmp_path), vision_tower=clip_dir[0])
  assert ours.config.layout == "v1" and ours.config.projector == "linear"
  assert ours.config.image_token_id == IMAGE_TOKEN
  ids, px = inputs(seed=2)
  ref = v1_reference(llama, projector, clip_model, ids, px)
  assert max_err(ours_logits(ours, ids, px), ref) <= tol(ref)


def test_llava_v1_without_clip_says_what_to_pass(tmp_path, clip_dir):
  make_v1_folder(str(tmp_path), clip_dir, embed_clip=False)
  with pytest.raises(ValueError, match="pass vision_tower="):
    from_pretrained(LlavaForConditionalGeneration, str(tmp_path))


def test_image_token_count_checked():
  ids = np.zeros((2, 10), np.int32)
  ids[0, :4] = IMAGE_TOKEN
  with pytest.raises(ValueError, match=r"rows \[1\] hold \[0\] image tokens, expected 4"):
    check_image_tokens(ids, IMAGE_TOKEN, 4)
