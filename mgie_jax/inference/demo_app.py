"""The demo page (Gradio Blocks) and the request handler behind it.

`PhotoEditor.edit` is the whole request without Gradio: read and check the upload, edit it at its
own shape (`mgie_jax.inference.photos`), return the expressive instruction and the edit. A bad
input raises `BadRequest`, which the page shows as a message; the server keeps serving. One edit
runs at a time (the queue's concurrency limit and a lock: one accelerator), with progress over
the denoising steps.
"""

from __future__ import annotations

import random
import threading

import gradio as gr
import jax

from mgie_jax.core.images import MIN_SIDE, BadImage, open_rgb
from mgie_jax.inference import photos
from mgie_jax.inference.pipeline import default_sampler
from mgie_jax.inference.shapes import stride

HELP = {
    "steps": "Denoising steps: more is slower and usually cleaner.",
    "text_scale": "Text guidance: how strongly the edit follows the instruction (higher = stronger edit).",
    "image_scale": "Image guidance: how closely the result keeps to the input image (higher = closer).",
    "seed": "Sampling seed: the same seed, image and settings give the same edit.",
    "randomize": "Draw a new seed for every edit.",
    "resolution": "Long side the model edits at (rounded to the model's stride); the result is returned "
                  "at the input's size.",
    "keep_unchanged": "Keep the photo's own pixels wherever the edit did not change the image.",
}
DEFAULT_MAX_PIXELS = 4096 * 4096


class BadRequest(ValueError):
  """An input the page refuses, with the message it shows."""


def lenient_upload(image: gr.Image) -> gr.Image:
  """Hand the handler the uploaded file's path even when PIL cannot open it, so the handler's own
  checks say what is wrong (Gradio's preprocessing error names no cause). Set on the instance: a
  subclass would make Gradio write a .pyi stub beside this file."""
  strict = image.preprocess

  def preprocess(payload):
    try:
      return strict(payload)
    except Exception:
      return None if payload is None or payload.path is None else str(payload.path)
  image.preprocess = preprocess
  return image


class PhotoEditor:
  """A loaded MGIE and the page's defaults; `edit` serves one request."""

  def __init__(self, model, tok, mesh, resolution: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_new_tokens: int = 96):
    self.model, self.tok, self.mesh = model, tok, mesh
    self.resolution, self.max_pixels, self.max_new_tokens = resolution, max_pixels, max_new_tokens
    self.stride = stride(model.config)
    self._lock = threading.Lock()

  def read(self, path):
    if not path:
      raise BadRequest("Upload an image (or pick an example) first.")
    try:
      return open_rgb(path, self.max_pixels)
    except BadImage as e:
      if e.reason == "too_large":
        raise BadRequest(f"The image is too large ({e}): this page edits images up to {self.max_pixels:,} pixels.") from None
      if e.reason == "too_small":
        raise BadRequest(f"The image is too small ({e}): both sides must be at least {MIN_SIDE} pixels.") from None
      raise BadRequest(f"That file is not an image this page can read ({e}).") from None
    except OSError as e:
      raise BadRequest(f"The upload could not be read ({e}).") from None

  def edit(self, path, instruction: str, steps: int = 100, text_scale: float = 7.5, image_scale: float = 1.5,
           seed: int = 0, randomize: bool = False, resolution: int = 0, keep_unchanged: bool = False,
           on_step=None):
    """(expressive instruction, uint8 HxWx3 edit at the input's size, the seed used)."""
    image = self.read(path)
    instruction = (instruction or "").strip()
    if not instruction:
      raise BadRequest("Type an instruction, e.g. \"make the square blue\".")
    steps = int(steps)
    if not 1 <= steps <= 1000:
      raise BadRequest("Steps must be between 1 and 1000.")
    seed = random.randrange(2 ** 31) if randomize else int(seed)
    res = int(resolution) or self.resolution
    res = max(self.stride, round(res / self.stride) * self.stride)
    with self._lock, jax.set_mesh(self.mesh):
      out, texts = photos.edit_photos(
          self.model, self.tok, [image], [instruction], seeds=[seed], resolution=res,
          keep_unchanged=bool(keep_unchanged), steps=steps, text_scale=float(text_scale),
          image_scale=float(image_scale), sampler=default_sampler(self.model),
          max_new_tokens=self.max_new_tokens, on_step=on_step)
    return texts[0], out[0], seed


def build_app(editor: PhotoEditor, examples=(), note: str = "", title: str = "MGIE") -> gr.Blocks:
  """The page: input and edit side by side, the expressive instruction, the sampling controls."""

  def run(path, instruction, steps, text_scale, image_scale, seed, randomize, resolution, keep_unchanged,
          progress=gr.Progress()):
    progress(0, desc="writing the expressive instruction")
    report = lambda done, total: progress((done, total), desc="denoising", unit="steps")
    try:
      text, image, used = editor.edit(path, instruction, steps, text_scale, image_scale, seed, randomize,
                                      resolution, keep_unchanged, on_step=report)
    except BadRequest as e:
      raise gr.Error(str(e), print_exception=False) from None
    return text, image, used

  with gr.Blocks(title=title, analytics_enabled=False) as app:
    gr.Markdown(f"# {title}: instruction-based image editing guided by a multimodal LLM\n{note}")
    with gr.Row():
      source = lenient_upload(gr.Image(label="Input", type="filepath", image_mode=None,
                                       sources=["upload", "clipboard"]))
      result = gr.Image(label="Edit", type="numpy", format="png", interactive=False)
    instruction = gr.Textbox(label="Instruction", placeholder="make the square blue", lines=1)
    expressive = gr.Textbox(label="Expressive instruction (written by the MLLM)", interactive=False)
    button = gr.Button("Edit", variant="primary")
    with gr.Accordion("Settings", open=False):
      with gr.Row():
        steps = gr.Slider(1, 200, value=100, step=1, label="Steps", info=HELP["steps"])
        resolution = gr.Slider(0, 1024, value=0, step=editor.stride, label="Resolution (0: the model's)",
                               info=HELP["resolution"])
      with gr.Row():
        text_scale = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Text guidance", info=HELP["text_scale"])
        image_scale = gr.Slider(1.0, 5.0, value=1.5, step=0.1, label="Image guidance", info=HELP["image_scale"])
      with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", info=HELP["seed"])
        randomize = gr.Checkbox(value=False, label="Randomize seed", info=HELP["randomize"])
        keep = gr.Checkbox(value=False, label="Keep unchanged pixels", info=HELP["keep_unchanged"])
    if examples:
      gr.Examples(examples=[list(e) for e in examples], inputs=[source, instruction], label="Examples")
    button.click(run, [source, instruction, steps, text_scale, image_scale, seed, randomize, resolution, keep],
                 [expressive, result, seed], api_name="edit", concurrency_limit=1)
    instruction.submit(run, [source, instruction, steps, text_scale, image_scale, seed, randomize, resolution,
                             keep], [expressive, result, seed], api_name=False, concurrency_limit=1)
  return app


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, allowed_paths=(), block: bool = True):
  """Queue one edit at a time and serve: no share link, no server-side rendering (no Node), errors
  shown on the page, the system's fonts."""
  app.queue(default_concurrency_limit=1)
  return app.launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True, ssr_mode=False,
                    allowed_paths=list(allowed_paths), theme=theme(), footer_links=["api"],
                    prevent_thread_lock=not block)


def theme():
  """Gradio's default look on the system's fonts (its default fetches Google Fonts)."""
  system = ["ui-sans-serif", "system-ui", "sans-serif"]
  return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
