"""An MGIE edit in PyTorch from `python -m mgie_jax.export --format=mgie,llava-hf,diffusers`.

Needs torch, transformers and diffusers only (no JAX is imported):

  from mgie_jax.inference.pytorch_pipeline import MGIEPipeline
  pipe = MGIEPipeline.from_export("/exports/mgie")          # llava-hf/, diffusers/, mgie/mllm.pt
  image, text = pipe.edit(Image.open("photo.jpg"), "make it blue", steps=100, seed=0)

The steps are `mgie_jax.inference.pipeline`'s: transformers' LLaVA writes the expressive instruction
greedily (no repeated 3-grams, stopping at </s> or [IMG0]); the prompt, that text and [IMG0..7]
are run once more to read the last-layer states of the [IMG] window (from one token before
[IMG0]); the edit head (`EditHead`, loaded from mllm.pt's `edit_head.*` and `emb`) turns them into
the condition and the null condition; diffusers' InstructPix2Pix pipeline edits the VAE latents.
The noise comes from torch's generator for `seed`; to reproduce a JAX edit exactly, pass the
initial `latents` and (for the ancestral sampler) the per-step `noise` it drew.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import torch
from PIL import Image

from mgie_jax.core.images import clip_view, mgie_square, to_model_range
from mgie_jax.text.template import img_window_start, prompt_text
from mgie_jax.text.tokenizer import IMG_TOKENS


class EditHead(torch.nn.Module):
  """The edit head as the release defines it: Linear(llm -> width) on h + e, a pre-LN
  nn.Transformer (no dropout at inference) from the [IMG] states to learned queries, Linear(width -> 768)."""

  def __init__(self, llm_dim=4096, width=512, heads=4, ffn=2048, encoder_layers=4, decoder_layers=4,
               num_queries=77, out_dim=768, eps=1e-5):
    super().__init__()
    self.llm2hid = torch.nn.Linear(llm_dim, width)
    self.query = torch.nn.Parameter(torch.zeros(1, num_queries, width))
    self.mapper = torch.nn.Transformer(width, heads, encoder_layers, decoder_layers, ffn, dropout=0.0,
                                       layer_norm_eps=eps, batch_first=True, norm_first=True)
    self.hid2feat = torch.nn.Linear(width, out_dim)

  def forward(self, hidden, emb):
    """hidden [B, 8, llm_dim] ([IMG] window states), emb [1, 8, llm_dim] -> [B, 77, out_dim]."""
    x = self.llm2hid(hidden + emb)
    return self.hid2feat(self.mapper(x, self.query.expand(x.shape[0], -1, -1)))

  @classmethod
  def from_state_dict(cls, state: dict, heads: int = 4, eps: float = 1e-5) -> "EditHead":
    """From `edit_head.*` tensors (mllm.pt); sizes read off the shapes, heads and eps as given."""
    s = {k[len("edit_head."):]: v for k, v in state.items() if k.startswith("edit_head.")}
    count = lambda kind: len({k.split(".")[3] for k in s if k.startswith(f"mapper.{kind}.layers.")})
    head = cls(llm_dim=s["llm2hid.weight"].shape[1], width=s["llm2hid.weight"].shape[0], heads=heads,
               ffn=s["mapper.encoder.layers.0.linear1.weight"].shape[0], encoder_layers=count("encoder"),
               decoder_layers=count("decoder"), num_queries=s["query"].shape[1],
               out_dim=s["hid2feat.weight"].shape[0], eps=eps)
    head.load_state_dict({k: v.float() for k, v in s.items()})
    return head.eval()


@contextlib.contextmanager
def _given_noise(noise):
  """Euler-ancestral draws its per-step noise through diffusers' randn_tensor: hand it `noise`."""
  if noise is None:
    yield
    return
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a
  queue, original = [torch.as_tensor(np.asarray(n)) for n in noise], euler_a.randn_tensor
  euler_a.randn_tensor = lambda *a, **k: queue.pop(0)
  try:
    yield
  finally:
    euler_a.randn_tensor = original


class MGIEPipeline:
  """transformers' LLaVA + the edit head + diffusers' InstructPix2Pix pipeline."""

  def __init__(self, llava, tokenizer, edit_head, emb, ip2p, num_image_tokens: int, template: str = "llava_v1"):
    self.llava, self.tokenizer, self.edit_head, self.emb, self.ip2p = llava, tokenizer, edit_head, emb, ip2p
    self.num_image_tokens, self.template = num_image_tokens, template
    self.img_ids = tokenizer.convert_tokens_to_ids(list(IMG_TOKENS))

  @classmethod
  def from_export(cls, folder: str, dtype=torch.float32) -> "MGIEPipeline":
    import diffusers
    import transformers
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(
        os.path.join(folder, "llava-hf"), torch_dtype=dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(folder, "llava-hf"))
    mllm = torch.load(os.path.join(folder, "mgie", "mllm.pt"), weights_only=True)
    head_cfg, template = {}, "llava_v1"
    cfg_file = os.path.join(folder, "mgie", "edit_head.json")
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        saved = json.load(f)
      head_cfg = {k: v for k, v in saved.items() if k in ("heads", "eps")}
      template = saved.get("template", template)
    head = EditHead.from_state_dict(mllm, **head_cfg).to(dtype)
    ip2p = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
        os.path.join(folder, "diffusers"), text_encoder=None, tokenizer=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, torch_dtype=dtype)
    ip2p.set_progress_bar_config(disable=True)
    return cls(llava, tok, head, mllm["emb"].to(dtype), ip2p, llava.config.image_seq_length, template)

  @torch.no_grad()
  def expressive(self, clip_pixels, instruction: str, max_new_tokens: int = 96):
    """(expressive instruction, condition [1, 77, 768], null condition) for one CLIP view [1, 3, c, c]."""
    prompt = self.tokenizer(prompt_text(instruction, self.num_image_tokens, self.template), return_tensors="pt")["input_ids"]
    eos = self.tokenizer.eos_token_id
    # LGIE: the language model never sees the image (transformers wants no pixel_values key then).
    image = {} if self.template == "text_only" else {"pixel_values": clip_pixels}
    gen = self.llava.generate(input_ids=prompt, **image, do_sample=False,
                              max_new_tokens=max_new_tokens, no_repeat_ngram_size=3, eos_token_id=eos,
                              pad_token_id=0)
    new = gen[0, prompt.shape[1]:].tolist()
    stop = {eos, 0, *self.img_ids}
    new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]
    full = torch.as_tensor([prompt[0].tolist() + new + self.img_ids])
    hidden = self.llava(input_ids=full, **image, output_hidden_states=True).hidden_states[-1]
    start = int(img_window_start(full.numpy(), self.img_ids[0])[0])
    window = hidden[:, start:start + len(IMG_TOKENS)]
    emb = self.emb.to(window.dtype)
    return (self.tokenizer.decode(new, skip_special_tokens=True), self.edit_head(window, emb),
            self.edit_head(torch.zeros_like(window), emb))

  @torch.no_grad()
  def edit(self, image: Image.Image, instruction: str, *, resolution: int = 512, steps: int = 100,
           text_scale: float = 7.5, image_scale: float = 1.5, seed: int = 0, sampler: str = "euler_ancestral",
           max_new_tokens: int = 96, latents=None, noise=None, output_type: str = "pil"):
    """Edit `image` by `instruction`, cropped to a square at `resolution` as MGIE's `edit` does.
    Returns (edited image: PIL, or float [R, R, 3] in [0, 1] with output_type="np", text).
    `sampler`: "euler_ancestral" (MGIE's), "euler" or "ddim", on the exported noise schedule."""
    import diffusers
    square = mgie_square(image.convert("RGB"))
    clip_size = self.llava.config.vision_config.image_size
    clip = torch.as_tensor(clip_view(square, clip_size)[None].transpose(0, 3, 1, 2).copy(), dtype=self.emb.dtype)
    text, cond, null = self.expressive(clip, instruction, max_new_tokens)
    # In [0, 1]: diffusers takes a tensor in [-1, 1] only with a deprecation warning.
    pixels = torch.as_tensor((to_model_range(square, resolution)[None].transpose(0, 3, 1, 2) + 1) / 2)
    kinds = {"euler_ancestral": diffusers.EulerAncestralDiscreteScheduler, "euler": diffusers.EulerDiscreteScheduler,
             "ddim": diffusers.DDIMScheduler}
    self.ip2p.scheduler = kinds[sampler].from_config(self.ip2p.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    with _given_noise(noise):
      out = self.ip2p(image=pixels.to(self.emb.dtype), prompt_embeds=cond, negative_prompt_embeds=null,
                      latents=None if latents is None else torch.as_tensor(np.asarray(latents)),
                      num_inference_steps=steps, guidance_scale=text_scale, image_guidance_scale=image_scale,
                      generator=generator, output_type=output_type)
    return out.images[0], text
