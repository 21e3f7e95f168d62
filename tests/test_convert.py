import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import max_err, save_llama, tol
from mgie_jax.convert import from_pretrained, CheckpointError, export_state_dict
from mgie_jax.convert.mllm import clip_vision_rules, llama_rules
from mgie_jax.models import ClipVisionModel, LlamaForCausalLM


class Payload:
  """Stands for any pickled object a malicious .bin could carry."""


def copy_folder(src, dst):
  shutil.copytree(src, dst, dirs_exist_ok=True)
  return str(dst)


def test_export_round_trips_to_the_torch_state_dict(llama_dir, clip_dir):
  path, ref = llama_dir
  ours = from_pretrained(LlamaForCausalLM, path)
  exported = export_state_dict(ours, llama_rules(ours.config))
  expected = {k: v.numpy() for k, v in ref.state_dict().items() if "rotary" not in k}
  assert set(exported) == set(expected)
  for k in expected:
    assert exported[k].shape == expected[k].shape and max_err(exported[k], expected[k]) == 0.0, k
  cpath, cref = clip_dir
  clip = export_state_dict(from_pretrained(ClipVisionModel, cpath), clip_vision_rules())
  cexp = {k: v.numpy() for k, v in cref.state_dict().items() if "position_ids" not in k}
  assert set(clip) == set(cexp) and all(max_err(clip[k], cexp[k]) == 0.0 for k in cexp)


def test_sharded_safetensors_and_bin_folders(tmp_path, llama_dir):
  _, ref = llama_dir
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  ids = np.random.default_rng(0).integers(3, 128, (1, 6))
  with torch.no_grad():
    want = ref(torch.as_tensor(ids)).logits.numpy()
  got = from_pretrained(LlamaForCausalLM, str(tmp_path / "sharded"))(ids).logits
  assert max_err(got, want) <= tol(want)
  # A .bin folder goes through torch.load(weights_only=True).
  os.makedirs(tmp_path / "bin")
  shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin" / "config.json")
  torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  got = from_pretrained(LlamaForCausalLM, str(tmp_path / "bin"))(ids).logits
  assert max_err(got, want) <= tol(want)


def test_bin_with_arbitrary_objects_is_refused(tmp_path, llama_dir):
  folder = copy_folder(llama_dir[0], tmp_path / "evil")
  os.remove(os.path.join(folder, "model.safetensors"))
  torch.save({"model.norm.weight": Payload()}, os.path.join(folder, "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match="weights_only"):
    from_pretrained(LlamaForCausalLM, folder)


def test_every_problem_reported_together(tmp_path, llama_dir):
  folder = copy_folder(llama_dir[0], tmp_path / "broken")
  sd = load_file(os.path.join(folder, "model.safetensors"))
  del sd["model.layers.1.mlp.up_proj.weight"]                 # missing
  sd["model.norm.weight"] = torch.zeros(63)                     # mis-shaped
  sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64)  # wrong rank
  sd["model.extra.weight"] = torch.zeros(3)                     # unexpected
  save_file(sd, os.path.join(folder, "model.safetensors"))
  with pytest.raises(CheckpointError) as err:
    from_pretrained(LlamaForCausalLM, folder)
  msg = str(err.value)
  assert len(err.value.problems) == 4, msg
  assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
  assert "model.norm.weight: shape mismatch, checkpoint gives (63,)" in msg
  assert "model.layers.0.self_attn.q_proj.weight: shape (64,) has rank 1" in msg
  assert "unexpected tensor model.extra.weight" in msg


def test_config_shape_mismatch_lists_all_layers(tmp_path, llama_dir):
  folder = copy_folder(llama_dir[0], tmp_path / "wider")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 100
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError) as err:
    from_pretrained(LlamaForCausalLM, folder)
  # gate/up/down of both layers: 6 problems, each naming the tensor.
  assert len(err.value.problems) == 6
  assert all("shape mismatch" in p for p in err.value.problems)


def test_unknown_architecture_missing_files(tmp_path, llama_dir):
  folder = copy_folder(llama_dir[0], tmp_path / "arch")
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  cfg["architectures"] = ["MistralForCausalLM"]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match=r"unknown architecture \['MistralForCausalLM'\]"):
    from_pretrained(LlamaForCausalLM, folder)
  with pytest.raises(CheckpointError, match="does not exist|not a directory"):
    from_pretrained(LlamaForCausalLM, str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="config.json is missing"):
    from_pretrained(LlamaForCausalLM, str(tmp_path / "empty"))
  with open(tmp_path / "empty" / "config.json", "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"]}, f)
  with pytest.raises(CheckpointError, match="no weight file"):
    from_pretrained(LlamaForCausalLM, str(tmp_path / "empty"))


def test_bf16_checkpoint_loads(tmp_path):
  path, ref = save_llama(tmp_path, seed=7)
  ref.to(torch.bfloat16).save_pretrained(tmp_path)
  ours = from_pretrained(LlamaForCausalLM, path)      # stored bf16, loaded into fp32 params
  exported = export_state_dict(ours, llama_rules(ours.config))
  stored = {k: v.float().numpy() for k, v in ref.to(torch.bfloat16).state_dict().items() if "rotary" not in k}
  assert set(exported) == set(stored)
  for k, want in stored.items():             # every tensor, exactly its bf16 value
    assert exported[k].dtype == np.float32 and max_err(exported[k], want) == 0.0, k
  assert any(np.abs(w - np.round(w)).max() > 0 for w in stored.values())   # not trivial values
