import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import max_err, tol
from mgie_jax.core import parallel
from mgie_jax.inference.greedy import greedy_generate
from mgie_jax.models import (ClipVisionConfig, LlamaConfig, LlavaConfig,
                             LlavaForConditionalGeneration)



def tiny_llava(vocab=128):
  cfg = LlavaConfig(
      vision=ClipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=7),
      text=LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
      projector="mlp2x_gelu", image_token_id=120, layout="hf")
  return LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))


def batch(b=4):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 100, (b, 24))
  ids[:, 2:18] = 120
  return jnp.asarray(ids), jnp.asarray(rng.normal(size=(b, 28, 28, 3)), jnp.float32)


def spec(x):
  return x[...].sharding.spec


@pytest.mark.parametrize("shape", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_sharded_forward_equals_unsharded(shape):
  model = tiny_llava()
  ids, px = batch()
  want = model(ids, px).logits
  mesh = parallel.make_mesh(**shape)
  parallel.shard_module(model, mesh)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, px):
    with parallel.activate(mesh):
      return nnx.merge(graphdef, state)(ids, px).logits

  got = forward(state, ids, px)
  assert max_err(got, want) <= tol(want)
  # Parameters are placed as the rules say.
  tp = "tensor"  # named in the spec even where the mesh gives it size 1
  assert spec(model.language_model.model.layers.self_attn.q_proj.kernel) == P(None, "fsdp", tp)
  assert spec(model.language_model.model.layers.mlp.down_proj.kernel) == P(None, tp, "fsdp")
  assert spec(model.language_model.model.embed_tokens.embedding) == P(tp, "fsdp")
  assert spec(model.language_model.lm_head.kernel) == P("fsdp", tp)
  assert spec(model.vision_tower.layers.fc1.kernel) == P(None, "fsdp", tp)
  q = model.language_model.model.layers.self_attn.q_proj.kernel[...]
  shard = q.addressable_shards[0].data.shape
  assert shard == (2, 64 // mesh.shape["fsdp"], 64 // mesh.shape["tensor"])


def test_sharded_generation_matches(tmp_path):
  model = tiny_llava()
  ids, px = batch(2)
  mask = np.ones(ids.shape, np.int32)
  want = greedy_generate(model, ids, mask, pixel_values=px, max_new_tokens=6, eos_id=-1).sequences
  parallel.shard_module(model, parallel.make_mesh(fsdp=4, tensor=2))
  got = greedy_generate(model, ids, mask, pixel_values=px, max_new_tokens=6, eos_id=-1).sequences
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_indivisible_dimension_is_replicated_not_crashing(caplog):
  model = tiny_llava(vocab=127)            # 127 does not divide by tensor=2
  parallel.shard_module(model, parallel.make_mesh(fsdp=4, tensor=2))
  assert spec(model.language_model.lm_head.kernel) == P("fsdp", None)
  assert "not divisible" in caplog.text


def test_make_mesh_fills_and_validates():
  assert dict(parallel.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.make_mesh(data=3, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match="do not divide"):
    parallel.make_mesh(data=3, fsdp=-1)


def test_cpu_meshes_short_of_threads_are_warned_about():
  advice = parallel.cpu_threads_advice("cpu", 8, 2, {})
  assert "8 CPU devices on 2 cores" in advice and "PJRT_NPROC=32" in advice
  assert parallel.cpu_threads_advice("cpu", 8, 2, {"PJRT_NPROC": "32"}) is None
  assert parallel.cpu_threads_advice("cpu", 8, 64, {}) is None
  assert parallel.cpu_threads_advice("cpu", 1, 2, {}) is None
  assert parallel.cpu_threads_advice("tpu", 8, 2, {}) is None
  # This suite's own 8 devices (tests/conftest.py) have the threads.
  assert parallel.cpu_threads_advice("cpu", jax.local_device_count(), os.cpu_count() or 1, os.environ) is None


@pytest.mark.slow
def test_sharded_unet_forward_and_backward_equal_unsharded():
  from mgie_jax.models import UNet2DConditionModel, UNetConfig
  cfg = UNetConfig(in_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                   attention_head_dim=4, norm_num_groups=8)
  unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.float32)
  t = jnp.asarray([1, 200, 500, 999])
  ctx = jnp.asarray(rng.normal(size=(4, 7, 24)), jnp.float32)

  def loss_and_grad(mesh=None):
    graphdef, state = nnx.split(unet)

    @jax.jit
    def f(state, x, t, ctx):
      def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(x, t, ctx) ** 2)
      if mesh is None:
        return jax.value_and_grad(loss)(state)
      with parallel.activate(mesh):
        return jax.value_and_grad(loss)(state)

    return f(state, x, t, ctx)

  want_loss, want_grads = loss_and_grad()
  mesh = parallel.make_mesh(fsdp=4, tensor=2)
  parallel.shard_module(unet, mesh)
  assert spec(unet.down_blocks[0].resnets[0].conv1.kernel) == P(None, None, "fsdp", "tensor")
  assert spec(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel) == P("fsdp", "tensor")
  got_loss, got_grads = loss_and_grad(mesh)
  assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * max(1.0, abs(float(want_loss)))
  for (path, a), (_, b) in zip(nnx.to_flat_state(got_grads), nnx.to_flat_state(want_grads)):
    a, b = a.get_value(), b.get_value()
    assert max_err(a, b) <= 1e-5 * max(1.0, float(jnp.abs(b).max())), path
