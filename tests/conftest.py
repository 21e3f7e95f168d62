"""Shared fixtures: tiny random-weight PyTorch reference models saved with save_pretrained.

Eight simulated CPU devices are requested before JAX is imported, so that the
sharding tests can build meshes; unsharded tests simply run on device 0. The device-count flag
is appended to any XLA_FLAGS already set (the last occurrence wins), so a preset XLA_FLAGS
cannot silently skip the 8-device tests.
"""

import os


def xla_flags(devices: int, base: str | None = None) -> str:
  """XLA_FLAGS with `devices` simulated CPU devices appended to whatever flags are set."""
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  return f"{base} --xla_force_host_platform_device_count={devices}".strip()


ORIGINAL_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
# One persistent compilation cache for the whole run, subprocesses included: building a model
# eagerly compiles hundreds of small ops (about 30 s per process on 2 cores, 2 s from the cache).
# Removed when the run ends (about 80 MB per run otherwise left in /tmp).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mgie_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = xla_flags(8)
# Simulated CPU devices share one thread pool (8 threads for 8 devices on a 2-core box), and a CPU
# collective holds its thread while it waits for the other devices. There an 8-device step deadlocked
# (seven devices waiting in one collective, the eighth in an all-gather inside a scanned layer
# stack, no thread left for the rest) and XLA aborted the whole run after 40 s. Four threads per
# device leave room for collectives nested in loops; subprocesses inherit it.
os.environ.setdefault("PJRT_NPROC", "32")
os.environ["JAX_PLATFORMS"] = "cpu"      # fp32 CPU references and simulated meshes, on any machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="reference tests need torch: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=28, patch_size=7)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tol(ref) -> float:
  """docs/design.md, "Testing without accelerators or weights": max |ours - reference| <= 1e-4 x max(1, |reference|)."""
  return 1e-4 * max(1.0, float(np.abs(np.asarray(ref)).max()))


def max_err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP)).eval()
  path = tmp_path_factory.mktemp("clip")
  model.save_pretrained(path)
  return str(path), model


def save_llama(path, seed=0, **overrides):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()
  model.save_pretrained(path)
  return str(path), model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  return save_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gqa_llama_dir(tmp_path_factory):
  return save_llama(tmp_path_factory.mktemp("llama_gqa"), seed=1, num_key_value_heads=2,
                    rope_theta=500.0)


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
  """A small SentencePiece BPE model with LLaMA's special ids (unk 0, bos 1, eos 2)."""
  import sentencepiece as spm
  rng = np.random.default_rng(0)
  words = ("make it blue red green circle square triangle change the at top left bottom right "
           "background remove add move a an of to image what will this be like if healthier "
           "sky sunny chat between curious user and artificial intelligence assistant gives "
           "helpful detailed polite answers questions USER ASSISTANT").split()
  sents = [" ".join(rng.choice(words, 10)) + str(rng.choice(list(".,!?':"))) for _ in range(3000)]
  path = tmp_path_factory.mktemp("tokenizer")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sents), model_prefix=str(path / "tokenizer"), vocab_size=400,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      character_coverage=1.0, minloglevel=2)
  return str(path)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs of the commands (training, export, evaluation, "
                          "AOT compiles); `pytest -m 'not slow'` is the fast tier for development")


@pytest.fixture(scope="session")
def run_data(tmp_path_factory):
  """A small synthetic edit dataset: (built dataset folder, tokenizer folder, source folder)."""
  from saved_runs import write_data
  return write_data(str(tmp_path_factory.mktemp("run_data")))


@pytest.fixture(scope="session")
def saved_run(run_data, tmp_path_factory):
  """A tiny run (random weights) with checkpoints at steps 2, 4 and 6; tests only read it."""
  from saved_runs import write_saved_run
  return write_saved_run(run_data, str(tmp_path_factory.mktemp("saved_run")))
