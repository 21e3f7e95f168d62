"""The full MGIE from local pretrained folders named by a config (`config.pretrained`): LLaVA (v1
or llava-hf) + CLIP, the SD (or InstructPix2Pix) UNet and VAE, optionally MGIE's released
`mllm.pt` / `unet.pt`; the vocabulary grown by the MGIE tokens, the UNet widened to 8 channels.

`pretrained_plan` reads nothing: it checks every tensor's name and shape from the files' headers
and returns, per parameter of the model, a loader that reads that one tensor (or one layer of
a stacked one). Training places each parameter straight onto its sharding from its loader
(mgie_jax.run.model), export streams them to files (mgie_jax.convert.writers);
`load_pretrained` materialises the whole model on the host (tests, small models).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgie_jax.convert.diffusion import unet_plan, unet_plan_from_state_dict, vae_from_pretrained, vae_plan
from mgie_jax.convert.mapping import plan_module
from mgie_jax.convert.mllm import llava_source
from mgie_jax.convert.release import edit_head_plan
from mgie_jax.convert.torch_files import CheckpointError, open_weights, shape_of
from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.models import AutoencoderKL, LlavaForConditionalGeneration
from mgie_jax.models import lora as lora_lib
from mgie_jax.models.edit_head import EditHead, EditHeadConfig
from mgie_jax.models.lora import LoraConfig
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import TEMPLATES, LlamaTokenizer

EMBED = "mllm.language_model.model.embed_tokens.embedding"
LM_HEAD = "mllm.language_model.lm_head.kernel"


@dataclasses.dataclass
class Loader:
  """Where one parameter's values come from: `full()` the whole array (our layout, the source's
  dtype); `layer(i)` one slice of a parameter stacked over layers."""
  full: Callable[[], np.ndarray]
  layer: Callable[[int], np.ndarray] | None = None


@dataclasses.dataclass
class ModelPlan:
  config: MGIEConfig
  abstract: MGIE
  loaders: dict                      # our dotted path -> Loader, for every parameter

  def materialize(self, dtype=None) -> MGIE:
    """The whole model on the default device (each parameter in `dtype` or its declared one)."""
    graphdef, state = nnx.split(self.abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
      name = ".".join(map(str, path))
      flat.append((path, var.replace(jnp.asarray(self.loaders[name].full(), dtype or var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _from_plan(plan, prefix: str) -> dict:
  return {f"{prefix}{p}": Loader(lambda p=p: plan.full(p), lambda i, p=p: plan.layer(p, i)) for p in plan.paths()}


def _from_module(module, prefix: str) -> dict:
  """Loaders over an already materialised (small) module, e.g. a freshly initialised edit head."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    value = var.get_value()
    out[prefix + ".".join(map(str, path))] = Loader(lambda v=value: np.asarray(v), lambda i, v=value: np.asarray(v[i]))
  return out


def _grown(load, vocab: int, axis: int, key) -> Loader:
  """A vocabulary-sized parameter grown to `vocab` entries along `axis`; new ones ~ N(0, 0.02)."""
  def full():
    w = load()
    extra = list(w.shape)
    extra[axis] = vocab - w.shape[axis]
    with jax.default_device(jax.devices("cpu")[0]):
      new = np.asarray(0.02 * jax.random.normal(key, tuple(extra), jnp.float32)).astype(w.dtype)
    return np.concatenate([w, new], axis)
  return Loader(full)


def load_vae(path: str, rt: dict) -> AutoencoderKL:
  return vae_from_pretrained(path, **rt)


def sd_noise_schedule(sd: str) -> NoiseSchedule | None:
  """The training schedule in an SD/InstructPix2Pix folder's scheduler/scheduler_config.json."""
  path = os.path.join(sd, "scheduler", "scheduler_config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return NoiseSchedule.from_diffusers(json.load(f))


def pretrained_plan(c, tok: LlamaTokenizer, rt: dict, loss: dict, lora: LoraConfig = LoraConfig(),
                    template: str = "llava_v1") -> ModelPlan:
  """Every parameter of the full MGIE with the loader that reads it (nothing is read here).
  `rt`: the towers' dtypes; `loss`: the training-loss fields; `lora`: adapters to add, which start
  from the seed (all from mgie_jax.run.model)."""
  p = c.pretrained
  if not p.llava or not p.sd:
    raise ValueError("config.pretrained.llava and config.pretrained.sd must name local folders")
  llava_cfg, tensors, rules, ignore = llava_source(p.llava, p.vision_tower or None, remat=c.model.remat,
                                                   attention_impl=c.model.attention_impl, **rt)
  llava = plan_module(lambda: LlavaForConditionalGeneration(llava_cfg, rngs=nnx.Rngs(0)), tensors, rules,
                      source=p.llava, ignore=ignore)
  loaders = _from_plan(llava, "mllm.")
  old, vocab = llava_cfg.text.vocab_size, len(tok)
  image_token = TEMPLATES[template].image_token
  if image_token and (image_token not in tok.added or tok.token_to_id(image_token) != llava_cfg.image_token_id):
    raise ValueError(f"{p.llava} reads image features at token {llava_cfg.image_token_id}, but the "
                     f"{template!r} prompt's {image_token} is {tok.added.get(image_token)} in the tokenizer: "
                     f"set config.model.template to the prompt this LLaVA was trained on")
  # LLaVA-1.5's llava-hf folders pad the vocabulary to 32064 rows: the MGIE tokens take padding
  # rows (kept as saved; they train with the rest of the table). Otherwise they are new rows.
  if vocab > old:     # the MGIE tokens: new rows of embed_tokens and lm_head ~ N(0, 0.02)
    k1, k2 = jax.random.split(jax.random.key(c.seed))
    loaders[EMBED] = _grown(loaders[EMBED].full, vocab, 0, k1)
    if not llava_cfg.text.tie_word_embeddings:
      loaders[LM_HEAD] = _grown(loaders[LM_HEAD].full, vocab, 1, k2)
    llava_cfg = dataclasses.replace(llava_cfg, text=dataclasses.replace(llava_cfg.text, vocab_size=vocab))
  head_cfg = EditHeadConfig(**dict(c.model.edit_head), **rt)
  if p.mllm_pt:
    mllm = open_weights(p.mllm_pt)
    loaders.update(_from_plan(edit_head_plan(mllm, head_cfg, source=p.mllm_pt), "edit_head."))
    for key, path, transpose in (("model.embed_tokens.weight", EMBED, False), ("lm_head.weight", LM_HEAD, True)):
      if key not in mllm:
        raise CheckpointError(p.mllm_pt, [f"missing tensor {key}"])
      loaders[path] = Loader(lambda k=key, t=transpose: np.asarray(mllm[k]).T if t else np.asarray(mllm[k]))
  else:
    loaders.update(_from_module(EditHead(head_cfg, rngs=nnx.Rngs(c.seed)), "edit_head."))
  kw = dict(attention_impl=c.model.attention_impl, remat=c.model.remat != "none", **rt)
  if p.unet_pt:
    unet_cfg, unet = unet_plan_from_state_dict(p.unet_pt, os.path.join(p.sd, "unet"), **kw)
  else:
    unet_cfg, unet = unet_plan(p.sd, in_channels=8, **kw)
  loaders.update(_from_plan(unet, "unet."))
  vae_cfg, vae = vae_plan(p.get("vae") or p.sd, **rt)
  loaders.update(_from_plan(vae, "vae."))
  cfg = MGIEConfig(llava=llava_cfg, edit_head=head_cfg, unet=unet_cfg, vae=vae_cfg,
                   img_token_id=tok.token_to_id("[IMG0]"), ins_loss_weight=c.train.ins_loss_weight,
                   lora=lora, template=template, **loss)
  abstract = nnx.eval_shape(lambda: MGIE(cfg, rngs=nnx.Rngs(0)))
  loaders.update(_adapter_loaders(abstract, c.seed))
  params = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  if params != set(loaders):
    raise ValueError(f"internal: parameters without a loader {sorted(params - set(loaders))[:5]}, loaders "
                     f"without a parameter {sorted(set(loaders) - params)[:5]}")
  _check_embeddings(loaders, abstract, p)
  return ModelPlan(cfg, abstract, loaders)


def _adapter_loaders(abstract, seed: int) -> dict:
  """Fresh LoRA factors: A from the seed (one key per layer path), B zeros."""
  out = {}
  key = jax.random.key(seed)
  for path, layer in lora_lib.adapted_layers(abstract).items():
    a, b = layer.lora_a.get_value(), layer.lora_b.get_value()

    def full_a(path=path, a=a):
      with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(lora_lib.initial_a(key, path, a.shape, a.dtype))
    out[f"{path}.lora_a"] = Loader(full_a, lambda i, f=full_a: f()[i])
    out[f"{path}.lora_b"] = Loader(lambda b=b: np.zeros(b.shape, b.dtype), lambda i, b=b: np.zeros(b.shape[1:], b.dtype))
  return out


def _shape_of(model, path: str):
  node = model
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part, None)
    if node is None:
      return None
  return tuple(node.get_value().shape) if hasattr(node, "get_value") else None


def _check_embeddings(loaders, abstract, p):
  """mllm.pt's embed_tokens / lm_head must match the grown vocabulary (their shapes are read)."""
  if not p.mllm_pt:
    return
  mllm = open_weights(p.mllm_pt)
  problems = []
  for key, path, transpose in (("model.embed_tokens.weight", EMBED, False), ("lm_head.weight", LM_HEAD, True)):
    shape = shape_of(mllm, key)
    shape = shape[::-1] if transpose else shape
    if tuple(shape) != _shape_of(abstract, path):
      problems.append(f"{key}: shape {shape_of(mllm, key)} does not fit {path} {_shape_of(abstract, path)} "
                      "(is the tokenizer the one the weights were trained with?)")
  if problems:
    raise CheckpointError(p.mllm_pt, problems)
