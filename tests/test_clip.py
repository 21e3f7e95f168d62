import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import max_err, tol
from mgie_jax.models import ClipVisionModel
from mgie_jax.convert import from_pretrained


def nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def test_clip_vision_parity_all_hidden_states_and_pooled(clip_dir):
  path, ref_model = clip_dir
  ours = from_pretrained(ClipVisionModel, path)
  x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref = ref_model(pixel_values=x, output_hidden_states=True)
  out = ours(nhwc(x), output_hidden_states=True)
  assert len(out.hidden_states) == len(ref.hidden_states) == 4
  for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert max_err(a, b) <= tol(b), f"hidden state {i}"
  assert max_err(out.last_hidden_state, ref.last_hidden_state) <= tol(ref.last_hidden_state)
  assert max_err(out.pooler_output, ref.pooler_output) <= tol(ref.pooler_output)


def test_clip_bf16_close_to_fp32(clip_dir):
  path, _ = clip_dir
  x = nhwc(torch.randn(2, 3, 28, 28))
  ref = from_pretrained(ClipVisionModel, path)(x).last_hidden_state
  out = from_pretrained(ClipVisionModel, path, dtype="bfloat16")(x).last_hidden_state
  assert out.dtype == jnp.bfloat16
  # bf16 keeps 8 bits of mantissa; over 3 layers we allow 5% of the activation scale.
  assert max_err(out.astype(jnp.float32), ref) <= 0.05 * float(jnp.abs(ref).max())


def test_clip_rejects_wrong_image_shape(clip_dir):
  ours = from_pretrained(ClipVisionModel, clip_dir[0])
  with pytest.raises(ValueError, match="NHWC images of 28x28x3"):
    ours(jnp.zeros((1, 3, 28, 28)))
