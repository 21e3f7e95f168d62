"""Blocked attention against torch's fused SDPA (forward and gradients), and which
implementation "auto" picks for which platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax._src import mesh as mesh_lib

from mgie_jax.models import attention

TOL = 2e-5   # fp32, sums over up to 1,000 keys in another order than torch's kernel


def torch_attention(q, k, v, do):
  t = lambda x: torch.tensor(np.asarray(x), requires_grad=True)
  tq, tk, tv = (t(x).transpose(1, 2) for x in (q, k, v))     # torch: [B, H, L, D]
  tq.retain_grad(), tk.retain_grad(), tv.retain_grad()
  o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
  o.backward(torch.tensor(np.asarray(do)).transpose(1, 2))
  back = lambda x: x.detach().transpose(1, 2).numpy()
  return back(o), back(tq.grad), back(tk.grad), back(tv.grad)


def ours(q, k, v, do, impl):
  o, vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl), q, k, v)
  return (o, *vjp(do))


@pytest.mark.parametrize("q_len,kv_len", [(1024, 1024), (300, 300), (200, 77), (64, 64)],
                         ids=["unet-level", "padded-last-block", "cross-attention", "one-block"])
def test_blocked_attention_matches_torch_sdpa_with_gradients(q_len, kv_len):
  rng = np.random.default_rng(q_len + kv_len)
  q = rng.standard_normal((2, q_len, 4, 40), np.float32)
  k, v = (rng.standard_normal((2, kv_len, 4, 40), np.float32) for _ in range(2))
  do = rng.standard_normal(q.shape, np.float32)
  want = torch_attention(q, k, v, do)
  got = jax.jit(ours, static_argnums=4)(q, k, v, do, "blocked")
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=TOL, rtol=TOL, err_msg=name)
  # and XLA's one-shot attention agrees with both
  for g, x in zip(got, jax.jit(ours, static_argnums=4)(q, k, v, do, "xla")):
    np.testing.assert_allclose(np.asarray(g), np.asarray(x), atol=TOL, rtol=TOL)


def blocked_in(q_len, mask=None, abstract_mesh=None):
  q = jax.ShapeDtypeStruct((1, q_len, 2, 8), jnp.float32)
  f = lambda q: attention.dot_product_attention(q, q, q, mask=mask)
  if abstract_mesh is not None:
    with mesh_lib.use_abstract_mesh(abstract_mesh):
      text = str(jax.make_jaxpr(f)(q))
  else:
    text = str(jax.make_jaxpr(f)(q))
  return "custom_vjp_call" in text


def test_auto_picks_blocked_for_long_unmasked_attention_on_cpu_only():
  assert jax.default_backend() == "cpu"
  assert blocked_in(attention.BLOCKED_MIN_QUERIES)
  assert not blocked_in(attention.BLOCKED_MIN_QUERIES - 1)          # short: XLA's
  assert not blocked_in(1024, mask=jnp.ones((1, 1, 1024, 1024), bool))   # masked (the LLM): XLA's
  # Compiling for a TPU slice from this CPU host (mgie_jax.compile): the program stays XLA's.
  tpu = mesh_lib.AbstractMesh((4,), ("data",), abstract_device=mesh_lib.AbstractDevice(
      device_kind="TPU v5 lite", num_cores=None, platform="tpu"))
  assert not blocked_in(1024, abstract_mesh=tpu)
  cpu = mesh_lib.AbstractMesh((4,), ("data",), abstract_device=mesh_lib.AbstractDevice(
      device_kind="cpu", num_cores=None, platform="cpu"))
  assert blocked_in(1024, abstract_mesh=cpu)


def test_blocked_refuses_what_it_does_not_compute():
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="no mask or bias"):
    attention.dot_product_attention(q, q, q, mask=jnp.ones((1, 1, 8, 8), bool), implementation="blocked")
  with pytest.raises(ValueError, match="must be one of"):
    attention.dot_product_attention(q, q, q, implementation="flash")
