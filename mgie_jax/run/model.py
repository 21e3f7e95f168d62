"""The one place a config becomes a model: its structure (random initialisation for tiny configs,
local pretrained folders for the full recipe, or random towers with some parts loaded, e.g. the
tiny config's trained VAE), the split into trainable and frozen parameters, their placement on a
mesh, and their values (from the seed or from the files). `config.model.kind` is "mgie" (default)
or "ip2p" (the text-only InstructPix2Pix baseline). Training, inference, evaluation, export and
the AOT compiler all build the model here."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from mgie_jax.convert import pretrained as pretrained_lib
from mgie_jax.core import parallel
from mgie_jax.diffusion.schedule import NoiseSchedule
from mgie_jax.models import ClipVisionConfig, LlamaConfig, LlavaConfig, UNetConfig, VAEConfig
from mgie_jax.models.clip import ClipTextConfig
from mgie_jax.models.edit_head import EditHeadConfig
from mgie_jax.models.ip2p import InstructPix2Pix, IP2PConfig
from mgie_jax.models.lora import LoraConfig, LoraParam
from mgie_jax.models.mgie import MGIE, MGIEConfig
from mgie_jax.text import LlamaTokenizer


def runtime(c) -> dict:
  return dict(dtype=c.model.dtype, param_dtype="float32")


def noise_schedule(c) -> NoiseSchedule:
  """The training noise schedule: config.model.noise when it is set, else the pretrained SD
  folder's scheduler/scheduler_config.json, else SD's (scaled-linear, epsilon)."""
  given = dict(c.model.get("noise", None) or {})
  if given:
    return NoiseSchedule(**given)
  if pretrained(c, "sd"):
    found = pretrained_lib.sd_noise_schedule(pretrained(c, "sd"))
    if found is not None:
      return found
  return NoiseSchedule()


def loss_options(c, noise: NoiseSchedule | None = None) -> dict:
  """The training-loss fields every editor config takes from config.train (one place, so that
  random init, pretrained init and AOT compiles train the same loss)."""
  return dict(edit_loss_weight=c.train.edit_loss_weight,
              noise=noise if noise is not None else noise_schedule(c),
              min_snr_gamma=float(c.train.get("min_snr_gamma", 0.0)))


def pretrained(c, name: str) -> str:
  p = c.get("pretrained", None)
  return (p.get(name, "") or "") if p is not None else ""


def template(c) -> str:
  """The prompt the config's LLaVA was trained on (mgie_jax.text.template.TEMPLATES)."""
  return str(c.model.get("template", "llava_v1") or "llava_v1")


def lora_config(c) -> LoraConfig:
  l = dict(c.model.get("lora", None) or {})
  return LoraConfig(rank=int(l.get("rank", 0)), alpha=float(l.get("alpha", 16.0)),
                    dropout=float(l.get("dropout", 0.0)), targets=tuple(l.get("targets", ()) or ()))


def random_config(c, tok: LlamaTokenizer, vae: VAEConfig | None = None) -> MGIEConfig:
  """MGIEConfig for a randomly initialised model whose vocabulary is the tokenizer's."""
  m, rt = c.model, runtime(c)
  llava = LlavaConfig(
      vision=ClipVisionConfig(**dict(m.vision), **rt, remat=m.remat, attention_impl=m.attention_impl),
      text=LlamaConfig(vocab_size=len(tok), **dict(m.text), **rt, remat=m.remat,
                       attention_impl=m.attention_impl, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id),
      projector=m.projector, image_token_id=tok.token_to_id("<im_patch>"), layout="v1")
  return MGIEConfig(
      llava=llava, edit_head=EditHeadConfig(**dict(m.edit_head), **rt),
      unet=UNetConfig(in_channels=8, **dict(m.unet), **rt, attention_impl=m.attention_impl),
      vae=vae or VAEConfig(**dict(m.vae), **rt), img_token_id=tok.token_to_id("[IMG0]"),
      ins_loss_weight=c.train.ins_loss_weight, lora=lora_config(c), template=template(c), **loss_options(c))


def ip2p_config(c, tok: LlamaTokenizer, vae: VAEConfig | None = None) -> IP2PConfig:
  """The text-only baseline: a CLIP-style text encoder (random init) of the terse instruction."""
  m, rt = c.model, runtime(c)
  text = ClipTextConfig(vocab_size=len(tok), **dict(m.text_encoder), eos_token_id=tok.eos_id, **rt,
                        attention_impl=m.attention_impl)
  return IP2PConfig(text=text, unet=UNetConfig(in_channels=8, **dict(m.unet), **rt, attention_impl=m.attention_impl),
                    vae=vae or VAEConfig(**dict(m.vae), **rt), bos_id=tok.bos_id, eos_id=tok.eos_id,
                    text_length=int(c.data.text_length), clip_size=m.vision.image_size,
                    num_image_tokens=(m.vision.image_size // m.vision.patch_size) ** 2, **loss_options(c))


def model_kind(c) -> str:
  return c.model.get("kind", "mgie") or "mgie"


@dataclasses.dataclass
class Built:
  config: MGIEConfig | IP2PConfig
  abstract: MGIE | InstructPix2Pix     # shapes, dtypes and logical axes; no arrays
  plan: object | None = None           # pretrained init: a loader per parameter (convert.pretrained)
  loaded: dict = dataclasses.field(default_factory=dict)   # top-level part -> loaded module

  @property
  def host_model(self):
    """The whole pretrained model materialised on the host (small models, tests)."""
    return None if self.plan is None else self.plan.materialize()

  @property
  def cls(self):
    return InstructPix2Pix if isinstance(self.config, IP2PConfig) else MGIE


def synthetic_vae_dir(workdir) -> str:
  """Where the train command puts the VAE it trains on the synthetic data (pretrained.vae="synthetic")."""
  return os.path.join(str(workdir), "data", "vae")


def build(c, tok: LlamaTokenizer, workdir=None) -> Built:
  """The model a config describes; loads the pretrained parts it names (a "synthetic" VAE from
  `workdir`)."""
  if c.model.init == "random":
    loaded = {}
    vae_cfg = None
    vae = pretrained(c, "vae")
    if vae == "synthetic":
      if workdir is None:
        raise ValueError("config.pretrained.vae='synthetic' is the VAE trained under a workdir: pass it")
      vae = synthetic_vae_dir(workdir)
    if vae:
      loaded["vae"] = pretrained_lib.load_vae(vae, runtime(c))
      vae_cfg = loaded["vae"].config
    if model_kind(c) == "ip2p":
      cfg, cls = ip2p_config(c, tok, vae_cfg), InstructPix2Pix
    else:
      cfg, cls = random_config(c, tok, vae_cfg), MGIE
    return Built(cfg, nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(c.seed))), None, loaded)
  if c.model.init != "pretrained":
    raise ValueError(f"config.model.init must be 'random' or 'pretrained', got {c.model.init!r}")
  plan = pretrained_lib.pretrained_plan(c, tok, runtime(c), loss_options(c), lora_config(c), template(c))
  return Built(plan.config, plan.abstract, plan)


class MGIEVocab:
  """The ids MGIE's tokenizer gives its special tokens (docs/design.md, "Vocabulary"), for building shapes where
  no tokenizer file is at hand (mgie_jax.compile)."""
  ids = {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002,
         **{f"[IMG{i}]": 32003 + i for i in range(8)}}
  bos_id, eos_id = 1, 2

  def __len__(self):
    return 32011

  def token_to_id(self, token: str) -> int:
    return self.ids[token]


def shapes_only(c) -> Built:
  """A random-init config's structure with MGIE's vocabulary and the config's own VAE shape
  (no tokenizer, no trained VAE folder needed)."""
  cfg = (ip2p_config if model_kind(c) == "ip2p" else random_config)(c, MGIEVocab())
  cls = InstructPix2Pix if model_kind(c) == "ip2p" else MGIE
  return Built(cfg, nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))


def standard_shapes(c) -> Built:
  """The full recipe's structure without any file: LLaVA-7B v1 (Vicuna-7B, CLIP ViT-L/14, linear
  projector, MGIE's 32011-token vocabulary), the edit head, SD-1.5's UNet (8 input channels)
  and VAE, with the config's dtypes, remat and attention. For ahead-of-time compiles
  (mgie_jax.compile) on machines that hold no weights; the layer sizes are the defaults of the
  model configs, which are these towers'."""
  m, rt = c.model, runtime(c)
  if template(c) == "llava_1_5":   # llava-hf/llava-1.5-7b-hf: CLIP-L/14 at 336 px, MLP projector, 32064 rows
    llava = LlavaConfig(
        vision=ClipVisionConfig(image_size=336, **rt, remat=m.remat, attention_impl=m.attention_impl),
        text=LlamaConfig(vocab_size=32064, **rt, remat=m.remat, attention_impl=m.attention_impl),
        projector="mlp2x_gelu", image_token_id=32000, layout="hf")
    img0 = 32005             # after <image> <pad> and <im_patch> <im_start> <im_end>
  else:
    llava = LlavaConfig(
        vision=ClipVisionConfig(**rt, remat=m.remat, attention_impl=m.attention_impl),
        text=LlamaConfig(vocab_size=32011, **rt, remat=m.remat, attention_impl=m.attention_impl),
        projector="linear", image_token_id=32000, layout="v1")
    img0 = 32003
  cfg = MGIEConfig(
      llava=llava, edit_head=EditHeadConfig(**dict(m.edit_head), **rt),
      unet=UNetConfig(in_channels=8, **rt, remat=m.remat != "none", attention_impl=m.attention_impl),
      vae=VAEConfig(**rt), img_token_id=img0, ins_loss_weight=c.train.ins_loss_weight, lora=lora_config(c),
      template=template(c), **loss_options(c, noise=NoiseSchedule()))
  return Built(cfg, nnx.eval_shape(lambda: MGIE(cfg, rngs=nnx.Rngs(0))))


# --- trainable / frozen split -------------------------------------------------------------------

def trainable_filter(prefixes):
  """An nnx filter selecting parameters whose dotted path starts with one of `prefixes`, and every
  LoRA adapter factor."""
  prefixes = tuple(prefixes)

  def select(path, value):
    name = ".".join(str(p) for p in path)
    return isinstance(value, LoraParam) or (
        isinstance(value, nnx.Param) and any(name == p or name.startswith(p + ".") for p in prefixes))
  return select


@dataclasses.dataclass
class ModelParts:
  graphdef: nnx.GraphDef
  trainable_template: nnx.State     # abstract, with logical-axis metadata
  frozen_template: nnx.State

  def merge(self, params: dict, frozen: dict):
    t = _from_pure(self.trainable_template, params)
    f = _from_pure(self.frozen_template, frozen)
    return nnx.merge(self.graphdef, t, f)


def _from_pure(template: nnx.State, pure: dict) -> nnx.State:
  flat = dict(nnx.to_flat_state(template))
  leaves = {tuple(p): v for p, v in _flatten(pure)}
  return nnx.from_flat_state([(p, var.replace(leaves[tuple(p)])) for p, var in flat.items()])


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def split_model(abstract_model, prefixes) -> ModelParts:
  graphdef, trainable, frozen = nnx.split(abstract_model, trainable_filter(prefixes), ...)
  if not jax.tree.leaves(trainable):
    raise ValueError(f"no parameter matches the trainable prefixes {list(prefixes)}")
  return ModelParts(graphdef, trainable, frozen)


def cast_tree(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --- values: from the seed or from the files, placed on a mesh ------------------------------------

@dataclasses.dataclass
class Placement:
  """Where a built model's parameters live: the mesh, the logical-axis rules, the trainable /
  frozen split and each part's shardings (pure dicts of NamedSharding)."""
  mesh: jax.sharding.Mesh
  rules: tuple
  parts: ModelParts
  trainable_sh: dict
  frozen_sh: dict


def config_rules(c) -> tuple:
  """The config's logical-axis rules (c.rules), or mgie_jax's defaults when it names none."""
  rules = c.get("rules", None) or parallel.DEFAULT_RULES
  return tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in rules)


def place(c, built: Built, devices=None) -> Placement:
  """The config's mesh (c.mesh) over `devices` (default: all) and the shardings of both parts."""
  mesh = parallel.make_mesh(**dict(c.mesh), devices=devices)
  rules = config_rules(c)
  parts = split_model(built.abstract, c.trainable)
  return Placement(mesh, rules, parts,
                   nnx.to_pure_dict(parallel.state_shardings(parts.trainable_template, mesh, rules)),
                   nnx.to_pure_dict(parallel.state_shardings(parts.frozen_template, mesh, rules)))


def seeded_split(c, built: Built) -> tuple[dict, dict]:
  """(trainable, frozen) of the seeded random initialisation, as pure dicts (traceable)."""
  model = built.cls(built.config, rngs=nnx.Rngs(c.seed))
  _, trainable, frozen = nnx.split(model, trainable_filter(c.trainable), ...)
  return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)


def trainable_params(c, built: Built, placed: Placement, dtype=jnp.float32) -> dict:
  """The trainable parameters' starting values on their shardings: each tensor from its file
  (pretrained), or the seeded initialisation computed on the devices."""
  if built.plan is not None:
    return parallel.place_tree(built.plan.loaders, nnx.to_pure_dict(placed.parts.trainable_template),
                               placed.trainable_sh, dtype)
  with jax.set_mesh(placed.mesh):
    return jax.jit(lambda: cast_tree(seeded_split(c, built)[0], dtype), out_shardings=placed.trainable_sh)()


def frozen_params(c, built: Built, placed: Placement) -> dict:
  """The frozen towers on their shardings, in config.model.frozen_dtype, rebuilt from their source
  (they are not checkpointed): the pretrained weights, or the seeded initialisation of a random
  config with its loaded parts (e.g. the synthetic VAE) swapped in."""
  dtype = jnp.dtype(c.model.frozen_dtype)
  if built.plan is not None:     # each tensor from its file straight onto its sharding
    return parallel.place_tree(built.plan.loaders, nnx.to_pure_dict(placed.parts.frozen_template),
                               placed.frozen_sh, dtype)
  with jax.set_mesh(placed.mesh):
    frozen = jax.jit(lambda: cast_tree(seeded_split(c, built)[1], dtype), out_shardings=placed.frozen_sh)()
  for name, module in built.loaded.items():
    if name not in frozen:
      raise ValueError(f"{name} is loaded from a folder but trained: list it as frozen")
    frozen[name] = jax.device_put(cast_tree(nnx.to_pure_dict(nnx.state(module)), dtype), placed.frozen_sh[name])
  return frozen


def tokenizer_dir(c, workdir: str) -> str:
  """The tokenizer folder a config names, or the synthetic one generated under the workdir."""
  if c.data.tokenizer:
    return c.data.tokenizer
  if pretrained(c, "llava"):
    return pretrained(c, "llava")
  return os.path.join(workdir, "data", "synthetic_source", "tokenizer")


# The frozen towers whose outputs the frozen-feature cache stores (mgie_jax.models.mgie.FEATURES).
FEATURE_TOWERS = ("vae", "mllm.vision_tower")


def subtree(tree: dict, names) -> dict:
  """The parts of a nested dict at dotted `names`, nested as in `tree`."""
  out = {}
  for name in names:
    *head, last = name.split(".")
    src, dst = tree, out
    for k in head:
      src, dst = src[k], dst.setdefault(k, {})
    dst[last] = src[last]
  return out


def frozen_towers(c, built: Built, placed: Placement, names=FEATURE_TOWERS) -> dict:
  """The frozen towers at dotted `names` only, on their shardings in frozen_dtype: a pretrained
  model's other towers (the 7B language model) are not read."""
  if built.plan is None:
    return subtree(frozen_params(c, built, placed), names)
  template = subtree(nnx.to_pure_dict(placed.parts.frozen_template), names)
  return parallel.place_tree(built.plan.loaders, template, subtree(placed.frozen_sh, names),
                             jnp.dtype(c.model.frozen_dtype))


def tower_sources(c, workdir=None) -> dict:
  """Where the frozen-feature towers come from, as a config says (checked before anything loads)."""
  vae = pretrained(c, "vae")
  if vae == "synthetic" and workdir:
    vae = synthetic_vae_dir(workdir)
  if not vae and c.model.init == "pretrained":
    vae = os.path.join(pretrained(c, "sd"), "vae")
  vision = (pretrained(c, "vision_tower") or pretrained(c, "llava")) if c.model.init == "pretrained" else ""
  norm = lambda p: p if p in ("", "synthetic") else os.path.abspath(p)
  return {"kind": model_kind(c), "init": str(c.model.init), "vae": norm(vae) or f"seed {c.seed}",
          "vision": norm(vision) or f"seed {c.seed}", "dtype": str(c.model.dtype),
          "frozen_dtype": str(c.model.frozen_dtype), "resolution": int(c.data.resolution)}
