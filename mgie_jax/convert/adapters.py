"""A LoRA run's adapters alone, for the PyTorch side (the `peft` export format):

  mllm/  PEFT's layout for transformers' LlamaForCausalLM (adapter_config.json,
         adapter_model.safetensors with base_model.model.<module>.lora_A/B.weight): load with
         `PeftModel.from_pretrained(llama, "mllm")` on the LLaMA of the exported LLaVA folder
  unet/  diffusers' layout (pytorch_lora_weights.safetensors, the LoRA config in the file's
         `lora_adapter_metadata`): load with `unet.load_lora_adapter("unet", prefix=None,
         weight_name="pytorch_lora_weights.safetensors")` on the UNet of the exported diffusers folder (or `PeftModel` as above, from unet/adapter_config.json)

Torch's Linear stores [out, in]: lora_A.weight is A transposed, [r, in], and lora_B.weight is B
transposed, [out, r]. The base to load them on is what the run started from (its pretrained folders:
an adapted layer's base weight is frozen), not the llava-v1/llava-hf/diffusers exports, which hold
the adapters merged already. The run's other trained parameters (embed_tokens, lm_head, the edit
head) are not here: they are in the `mgie` format's mllm.pt.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mgie_jax.convert.diffusion import derived_rules
from mgie_jax.convert.mllm import llama_rules
from mgie_jax.convert.save import save_safetensors

LLAMA = "mllm.language_model."


def _module_names(rules, prefix: str) -> dict:
  """our kernel path -> torch module name (with {i} for a layer stack), from an import table."""
  return {prefix + r.ours: r.torch[:-len(".weight")] for r in rules if r.ours.endswith(".kernel")}


def adapter_tensors(source, dtype):
  """({"mllm": tensors, "unet": tensors}, {"mllm": module names, "unet": module names}) in the torch layouts."""
  llama = _module_names(llama_rules(source.model_config.llava.text), LLAMA)
  unet = _module_names(derived_rules(source.abstract.unet), "unet.")
  out = {"mllm": {}, "unet": {}}
  modules = {"mllm": set(), "unet": set()}
  cast = lambda x: np.ascontiguousarray(np.asarray(x).T.astype(dtype))
  for layer in sorted(source.adapters):
    kernel = f"{layer}.kernel"
    a, b = source.raw(f"{layer}.lora_a"), source.raw(f"{layer}.lora_b")
    if kernel in llama:
      name = llama[kernel]
      for i in range(a.shape[0]) if "{i}" in name else [None]:
        module = name.replace("{i}", str(i)) if i is not None else name
        ai, bi = (a[i], b[i]) if i is not None else (a, b)
        out["mllm"][f"base_model.model.{module}.lora_A.weight"] = cast(ai)
        out["mllm"][f"base_model.model.{module}.lora_B.weight"] = cast(bi)
        modules["mllm"].add(module)
    elif kernel in unet:
      module = unet[kernel]
      out["unet"][f"{module}.lora_A.weight"] = cast(a)
      out["unet"][f"{module}.lora_B.weight"] = cast(b)
      modules["unet"].add(module)
    else:
      raise ValueError(f"the peft format holds LLaMA and UNet adapters; {layer} is in neither "
                       "(export the merged model with llava-v1, llava-hf or diffusers)")
  return out, modules


def write_peft(source, out: str, dtype="float32") -> list[str]:
  if not source.adapters:
    raise ValueError("the run has no LoRA adapters (config.model.lora.rank is 0)")
  lora = source.lora
  tensors, modules = adapter_tensors(source, dtype)
  written = []
  config = {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False}
  if tensors["mllm"]:
    folder = os.path.join(out, "mllm")
    save_safetensors(tensors["mllm"], os.path.join(folder, "adapter_model.safetensors"))
    leaf = sorted({m.rsplit(".", 1)[-1] for m in modules["mllm"]})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
      json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                 "inference_mode": True, "target_modules": leaf, **config}, f, indent=1)
    written.append("mllm")
  if tensors["unet"]:
    folder = os.path.join(out, "unet")
    targets = sorted(modules["unet"])
    meta = {"lora_adapter_metadata": json.dumps({"target_modules": targets, **config}, sort_keys=True)}
    save_safetensors(tensors["unet"], os.path.join(folder, "pytorch_lora_weights.safetensors"), meta)
    save_safetensors({f"base_model.model.{k}": v for k, v in tensors["unet"].items()},
                     os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
      json.dump({"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                 "target_modules": targets, **config}, f, indent=1)
    written.append("unet")
  return written
