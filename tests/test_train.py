"""The trainer: overfitting, sharded steps equal single-device ones, checkpoints and resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ORIGINAL_XLA_FLAGS, xla_flags
from configs import tiny
from data_pipelines import synthetic
from data_pipelines.ipr2pr import build
from data_pipelines.loader import LoaderConfig, make_dataset
from mgie_jax.training.checkpoint import Checkpointer
from mgie_jax.training.setup import make_setup
from mgie_jax.training.step import batch_sharding, jit_train_step

pytestmark = pytest.mark.slow      # the fast tier (-m 'not slow') leaves these out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("train_data"))
  synthetic.write_dataset(root, prompts=24, seeds=2, size=64)
  builder = build(root, os.path.join(root, "tfds"), "folder", os.path.join(root, "expressive.json"))
  return str(builder.data_dir), os.path.join(root, "tokenizer")


def config(data, **train):
  c = tiny.get_config()
  c.data.dir, c.data.tokenizer = data
  c.data.num_threads = 2
  c.log.sample_every = 0
  c.pretrained.vae = ""          # a random frozen VAE: these tests are about the trainer
  c.eval.at_end = False
  c.train.update(train)
  return c


def host_batch(c, run, n=1, seed=0):
  cfg = LoaderConfig(data_dir=c.data.dir, batch_size=c.train.batch_size, resolution=c.data.resolution,
                     clip_resolution=run.mcfg.llava.vision.image_size, tokenizer=c.data.tokenizer,
                     max_length=c.data.max_length, num_image_tokens=run.mcfg.llava.num_image_tokens,
                     seed=seed, num_threads=2)
  it = iter(make_dataset(cfg))
  out = [next(it) for _ in range(n)]
  for b in out:
    b.pop("key")
  return out


def device_batch(run, host):
  sh = batch_sharding(run)
  return {k: jax.device_put(v, sh) for k, v in host.items()}


def test_overfitting_one_batch_drives_both_losses_down_10x(data):
  c = config(data, lr_mllm=3e-3, lr_diffusion=1e-3, warmup_frac=0.02, steps=250)
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = run.new_state()
  step = jit_train_step(run, c.data.resolution, fixed_draws=True)
  batch = device_batch(run, host_batch(c, run)[0])
  first = None
  for _ in range(c.train.steps):
    state, m = step(state, frozen, batch)
    first = first or {k: float(v) for k, v in m.items()}
  last = {k: float(v) for k, v in m.items()}
  assert last["ins"] <= first["ins"] / 10, (first, last)
  assert last["edit"] <= first["edit"] / 10, (first, last)


def test_grad_accum_equals_the_whole_batch(data):
  """grad_accum=2 (two micro-batches of 4) gives the loss, gradient norm and update of one batch of 8:
  L_ins divides by the whole batch's target tokens, whatever micro-batch a token is in."""
  out = {}
  for accum in (1, 2):
    # The accum=2 run also keeps an EMA of the weights, which must not change the update.
    c = config(data, grad_accum=accum, ema_decay=0.5 if accum == 2 else 0.0)
    run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
    host = host_batch(c, run)[0]
    assert len(set(host["attention_mask"].sum(1).tolist())) > 1      # rows of different lengths
    state, frozen = run.new_state()
    assert (state.ema is None) == (accum == 1)
    init = flat(state.params)
    step = jit_train_step(run, c.data.resolution)
    state, m = step(state, frozen, device_batch(run, host))
    out[accum] = (m, flat(state.params), init, state, lambda s: step(s, frozen, device_batch(run, host))[0])
  (m1, p1, *_), (m2, p2, init, state, again) = out[1], out[2]
  for k in ("loss", "ins", "edit", "grad_norm"):
    assert abs(float(m2[k]) - float(m1[k])) <= 1e-5 * max(1.0, abs(float(m1[k]))), (k, m1[k], m2[k])
  for k in p1:
    assert np.abs(p1[k] - p2[k]).max() <= 1e-5 * max(1.0, float(np.abs(p1[k]).max())), k
  # The EMA: e <- d e + (1 - d) p after each update, d = 0.1 then 2/11 (the warm-up). The first
  # update has learning rate 0 (the schedule's warm-up starts there), so take a second one.
  want = {k: 0.1 * init[k] + 0.9 * p2[k] for k in init}
  state = again(state)
  p3 = flat(state.params)
  want = {k: 2 / 11 * want[k] + 9 / 11 * p3[k] for k in want}
  ema = flat(state.ema)
  for k in ema:
    np.testing.assert_allclose(ema[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert sum(not np.allclose(ema[k], p3[k], rtol=1e-4, atol=1e-6) for k in ema) > len(ema) // 2


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def single_device_step(data):
  c = config(data)
  one = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  host = host_batch(c, one)[0]
  s1, f1 = one.new_state()
  s1, m1 = jit_train_step(one, c.data.resolution)(s1, f1, device_batch(one, host))
  return c, host, s1, m1


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=4, tensor=1)])
def test_sharded_step_equals_single_device(data, mesh, single_device_step):
  c, host, s1, m1 = single_device_step
  c8 = config(data)
  c8.mesh = mesh
  eight = make_setup(c8, c.data.tokenizer)
  s8, f8 = eight.new_state()
  s8, m8 = jit_train_step(eight, c.data.resolution)(s8, f8, device_batch(eight, host))
  for k in ("loss", "ins", "edit", "grad_norm"):
    assert abs(float(m8[k]) - float(m1[k])) <= 1e-5 * max(1.0, abs(float(m1[k]))), k
  a, b = flat(s1.params), flat(s8.params)
  assert a.keys() == b.keys()
  for k in a:
    assert np.abs(a[k] - b[k]).max() <= 1e-5 * max(1.0, float(np.abs(a[k]).max())), k
  # Parameters and Adam moments are placed per the rules (tiny UNet: attention in down block 1).
  q = s8.params["unet"]["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
  want = jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.sharding.spec == want
  mu = s8.opt_state[1].inner_states["diffusion"].inner_state[0].mu
  assert mu["unet"]["down_blocks"][1]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"].sharding.spec == want
  emb = s8.params["mllm"]["language_model"]["model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec[1] == "fsdp"


def test_restore_onto_a_different_mesh(data, tmp_path):
  c = config(data)
  one = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, frozen = one.new_state()
  state, _ = jit_train_step(one, c.data.resolution)(state, frozen, device_batch(one, host_batch(c, one)[0]))
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2, async_save=True)
  ckpt.save(1, state, None, {"note": "test"}, force=True)
  ckpt.close()
  c8 = config(data)
  c8.mesh = dict(data=1, fsdp=4, tensor=2)
  eight = make_setup(c8, c.data.tokenizer)
  restored = Checkpointer(str(tmp_path), every=1, keep=2).restore(eight.abstract_state(), None)
  a, b = flat(state), flat(restored)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  kernel = restored.params["unet"]["conv_in"]["kernel"]
  assert kernel.sharding.mesh.shape == eight.mesh.shape and kernel.sharding.spec[2] == "fsdp"


def test_ema_decay_warms_up_then_caps():
  from mgie_jax.training.state import ema_decay_at
  got = [float(ema_decay_at(t, 0.5)) for t in (0, 1, 2, 3, 10_000)]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 0.25, 4 / 13, 0.5], rtol=1e-6)


def test_failing_restore_says_why(data, tmp_path):
  c = config(data)
  run = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  state, _ = run.new_state()
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2, async_save=False)
  ckpt.save(3, state, None, {}, force=True)
  ckpt.close()
  c2 = config(data)
  c2.model.unet.block_out_channels = (16, 32)            # a different model
  other = make_setup(c2, c.data.tokenizer, devices=jax.devices()[:1])
  from mgie_jax.core.errors import UserError
  with pytest.raises(UserError, match="checkpoint step 3 does not fit this model: params.unet"):
    Checkpointer(str(tmp_path), every=1, keep=2).restore(other.abstract_state(), None)


def test_turning_the_ema_on_or_off_resumes(data, tmp_path):
  """A run resumed with train.ema_decay changed keeps its weights: an EMA starts from them, or
  the saved one is dropped (not 'does not fit' or 'cannot be read')."""
  runs, saved_params = {}, {}
  for decay in (0.0, 0.5):
    c = config(data, ema_decay=decay)
    runs[decay] = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
    state, _ = runs[decay].new_state()
    state = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    saved_params[decay] = flat(state.params)
    ckpt = Checkpointer(str(tmp_path / str(decay)), every=1, keep=2, async_save=False)
    ckpt.save(3, state, None, {}, force=True)
    ckpt.close()
  for saved, now in ((0.0, 0.5), (0.5, 0.0)):
    restored = Checkpointer(str(tmp_path / str(saved)), every=1, keep=2).restore(runs[now].abstract_state(), None)
    params = flat(restored.params)
    assert params.keys() == saved_params[saved].keys()
    assert all(np.array_equal(params[k], saved_params[saved][k]) for k in params)
    assert (restored.ema is None) == (now == 0.0)
    if now:        # the EMA starts at the restored weights (the saved EMA would be the init)
      ema = flat(restored.ema)
      assert ema.keys() == params.keys() and all(np.array_equal(ema[k], params[k]) for k in ema)


# --- the command line: kill -9 and resume, several processes --------------------------------------

def train_cmd(workdir, data, *extra):
  return [sys.executable, "-m", "mgie_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.dir={data[0]}", f"--config.data.tokenizer={data[1]}", "--config.log.every=1",
          "--config.log.sample_every=0", "--config.log.tensorboard=False", "--config.data.num_threads=2",
          "--config.checkpoint.every=5", "--config.train.steps=14", "--config.pretrained.vae=",
          "--config.eval.at_end=False", "--config.train.ema_decay=0.999", *extra]


def without_thread_dumps(out: str) -> str:
  """A crashed process's log without the stacks Python's fault handler prints for every thread,
  so that a failure shows what went wrong rather than which threads were waiting."""
  dump = ("Thread 0x", "Current thread 0x", 'File "', "Extension modules:")
  return "\n".join(line for line in out.splitlines() if not line.strip().startswith(dump))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: (r["loss"], r["ins"], r["edit"]) for r in rows}


def env(devices=1):
  e = dict(os.environ)
  e["XLA_FLAGS"] = xla_flags(devices, ORIGINAL_XLA_FLAGS)
  e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
  return e


@pytest.fixture(scope="module")
def killed_and_resumed(data, tmp_path_factory):
  """An uninterrupted 14-step run, and the same command killed with SIGKILL mid-way then re-run."""
  root = tmp_path_factory.mktemp("kill")
  straight, killed = str(root / "straight"), str(root / "killed")
  subprocess.run(train_cmd(straight, data), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(train_cmd(killed, data), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline:
    if os.path.exists(os.path.join(killed, "metrics.jsonl")) and max(losses(killed), default=0) >= 8:
      break
    if proc.poll() is not None:
      pytest.fail("training exited before it could be killed")
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # The killed writer's claim is left behind: the re-run below must find it stale, not blocked.
  assert os.listdir(os.path.join(killed, "writer.lock"))
  killed_at = max(losses(killed))
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit())
  subprocess.run(train_cmd(killed, data), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
  return straight, killed, killed_at, ckpts


def test_sigkill_then_same_command_resumes_exactly(killed_and_resumed):
  straight, killed, killed_at, ckpts = killed_and_resumed
  assert killed_at < 14
  assert ckpts and max(ckpts) <= killed_at
  want, got = losses(straight), losses(killed)
  assert max(got) == 14
  for step in range(max(ckpts) + 1, 15):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f"step {step}")


def test_fine_tuning_starts_from_another_runs_weights_with_a_fresh_optimizer(data, killed_and_resumed, tmp_path):
  """config.init_from: step 0 holds the source checkpoint's weights (its EMA, as it kept one) exactly,
  the step count, optimizer and data iterator start afresh, and the run trains from there."""
  from mgie_jax.core.fingerprint import tree_fingerprint
  from mgie_jax.run.workdir import restore_params
  straight = killed_and_resumed[0]
  work = str(tmp_path / "finetune")
  p = subprocess.run(train_cmd(work, data, f"--config.init_from={straight}/checkpoints/14", "--config.train.steps=3",
                               "--config.train.ema_decay=0"), cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  line = [ln for ln in p.stderr.splitlines() if "starting from" in ln]
  assert len(line) == 1 and "(ema," in line[0], p.stderr[-3000:]
  run = make_setup(config(data), data[1], devices=jax.devices()[:1])
  source = restore_params(straight, 14, run.parts, run.state_sh.params, "--config.init_from", "ema")
  assert f"fingerprint {tree_fingerprint(source)})" in line[0]
  rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  # The first loss is the trained source's (below a fresh model's first), not a fresh model's.
  assert rows[0]["loss"] < losses(straight)[1][0]
  p = subprocess.run(train_cmd(str(tmp_path / "x"), data, f"--config.init_from={tmp_path}/nope/checkpoints/3"),
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and "--config.init_from" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]


def evr_train_split(data, root) -> str:
  """The synthetic pairs in EVR's release layout, built with the EVR builder: a benchmark's train
  split (no expressive instructions)."""
  import shutil
  from data_pipelines.eval_sets import build as build_eval
  source = os.path.dirname(data[1])
  recs = []
  for folder, seeds in json.load(open(os.path.join(source, "seeds.json")))[:16]:
    edit = json.load(open(os.path.join(source, folder, "prompt.json")))["edit"]
    for seed in seeds:
      names = [f"{folder}_{seed}_{j}.jpg" for j in (0, 1)]
      for j, name in enumerate(names):
        os.makedirs(os.path.join(root, "src", "images"), exist_ok=True)
        shutil.copyfile(os.path.join(source, folder, f"{seed}_{j}.jpg"), os.path.join(root, "src", "images", name))
      recs.append({"img0": names[0], "img1": names[1], "sents": [edit], "uid": f"{folder}_{seed}"})
  with open(os.path.join(root, "src", "train.json"), "w") as f:
    json.dump(recs, f)
  return str(build_eval("evr", os.path.join(root, "src"), os.path.join(root, "tfds")).data_dir)


def test_fine_tuning_on_a_benchmarks_train_split(data, killed_and_resumed, tmp_path):
  """A benchmark's records (target_image, no expressive instruction) train, the instruction standing
  in for the expressive target (counted); with an expressive file, its texts are the targets."""
  straight = killed_and_resumed[0]
  evr = evr_train_split(data, str(tmp_path))
  work = str(tmp_path / "ft")
  p = subprocess.run(train_cmd(work, data, f"--config.init_from={straight}/checkpoints/14", "--config.train.steps=6",
                               "--config.train.ema_decay=0", f"--config.data.dir={evr}"),
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "train on the instruction itself" in p.stderr
  rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
  assert np.mean([r["ins"] for r in rows[3:]]) < np.mean([r["ins"] for r in rows[:3]])   # it learns the new targets
  # With an expressive file for every key, nothing is substituted.
  from data_pipelines.loader import LoaderConfig, Preprocess, open_source
  src = open_source(evr, "train")
  keys = [src[i]["key"].decode() for i in range(len(src))]
  path = tmp_path / "expressive.json"
  path.write_text(json.dumps({k: {"instruction": "x", "expressive": f"Make it so, {k}."} for k in keys}))
  pre = Preprocess(LoaderConfig(data_dir=evr, tokenizer=data[1], resolution=32, clip_resolution=28, max_length=160,
                                num_image_tokens=16, expressive=str(path)))
  outs = [pre(src[i]) for i in range(4)]
  assert all(o is not None for o in outs) and not pre.substituted


@pytest.fixture(scope="module")
def bucketed_file_url_run(data, killed_and_resumed, tmp_path_factory):
  """The 14-step run again, through a file:// workdir, cut to length buckets, samples every 4
  steps, interrupted by Ctrl-C (SIGINT) after step 6 and resumed by the same command. While it
  runs, a second train command on the same workdir is refused."""
  root = tmp_path_factory.mktemp("bucketed")
  workdir = str(root / "run")
  # Examples here are 85-96 tokens (max_length 96): the longest of a batch of 8 is often 93-94.
  cmd = train_cmd("file://" + workdir, data, "--config.data.length_buckets=(90,92,94)",
                  "--config.log.sample_every=4", "--config.log.samples=2", "--config.log.sample_steps=2",
                  "--config.log.sample_new_tokens=4")
  err = open(root / "first.log", "w+")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err)
  deadline = time.time() + 600
  while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(losses(workdir), default=0) >= 6):
    assert time.time() < deadline and proc.poll() is None, "training ended before the signal"
    time.sleep(0.05)
  proc.send_signal(signal.SIGSTOP)        # hold it mid-run while the second writer tries
  with open(f"/proc/{proc.pid}/environ", "rb") as f:      # the environment the command re-ran itself with
    running_env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
  second = subprocess.run(train_cmd(workdir, data), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
  proc.send_signal(signal.SIGCONT)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=600)
  err.seek(0)
  logs = [err.read(), second]
  assert proc.returncode == 130, logs[0][-3000:]
  out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, [logs[0], out.stderr], second, running_env


def test_the_command_runs_with_huge_pages_where_the_machine_has_them(bucketed_file_url_run):
  from mgie_jax.core import hugepages
  argv = [sys.executable, "-m", "mgie_jax.train"]
  want = hugepages.environment(argv, env())
  assert bucketed_file_url_run[3].get("GLIBC_TUNABLES") == (want or env()).get("GLIBC_TUNABLES")


def test_a_second_writer_is_refused_while_the_first_runs(bucketed_file_url_run):
  second = bucketed_file_url_run[2]
  assert second.returncode == 2, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: another train command is writing to"), lines
  assert re.search(r"\(host \S+, pid \d+, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", lines[0]), lines[0]
  assert "resuming" not in second.stderr


def test_length_buckets_and_a_file_url_workdir_give_the_same_losses(bucketed_file_url_run, killed_and_resumed):
  workdir, logs = bucketed_file_url_run[:2]
  compiled = {int(n) for log in logs for n in re.findall(r"compiled the train step for (\d+) tokens", log)}
  assert 96 in compiled and compiled & {90, 92, 94}, compiled      # some batches ran shorter
  stopped = int(re.search(r"interrupted at step (\d+): saving", logs[0]).group(1))
  assert "Traceback" not in logs[0] and "interrupt: saving at the next step boundary" in logs[0]
  assert 6 <= stopped < 14 and "resuming from" in logs[1] and f"step {stopped}" in logs[1]
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())[-1] == 14
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [f"step_{s:07d}.png" for s in (4, 8, 12)]
  assert not os.path.exists(os.path.join(ROOT, "file:"))           # no folder named after the URL
  want, got = losses(killed_and_resumed[0]), losses(workdir)
  assert sorted(got) == list(range(1, 15))
  for step in got:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(data, killed_and_resumed, tmp_path):
  workdir = str(tmp_path / "nan")
  shutil.copytree(killed_and_resumed[1], workdir)            # a finished 14-step run
  ckpt_dir = os.path.join(workdir, "checkpoints")
  before = {d: sorted(os.listdir(os.path.join(ckpt_dir, d))) for d in os.listdir(ckpt_dir)}
  assert "14" in before
  # Continue it with a poisoned loss weight: step 15 is NaN.
  out = subprocess.run(train_cmd(workdir, data, "--config.train.steps=16", "--config.checkpoint.every=1",
                                 "--config.train.edit_loss_weight=nan"),
                       cwd=ROOT, env=env(), capture_output=True, timeout=600)
  assert out.returncode == 1, out.stderr.decode()[-2000:]
  assert ("loss is nan at step 15: stopping without saving; the last good checkpoint is step 14"
          in out.stderr.decode())
  after = {d: sorted(os.listdir(os.path.join(ckpt_dir, d))) for d in os.listdir(ckpt_dir)}
  assert after == before


def test_two_processes_match_one_process_through_a_one_host_preemption(data, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed over loopback) give the same losses as 1 x 8,
  also when only process 1 gets SIGTERM mid-run: both save the same step, exit 0, and the same
  command resumes to the uninterrupted losses."""
  one = str(tmp_path / "one")
  mesh = ["--config.mesh.fsdp=4", "--config.mesh.data=2", "--config.train.steps=24", "--config.data.shards=2",
          "--config.checkpoint.every=100"]
  subprocess.run(train_cmd(one, data, *mesh), cwd=ROOT, env=env(8), check=True, capture_output=True, timeout=600)
  two = str(tmp_path / "two")
  import portpicker

  def launch():
    port = portpicker.pick_unused_port()
    return [subprocess.Popen(train_cmd(two, data, *mesh, f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"),
                             cwd=ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for i in range(2)]

  def finish(procs, stage):
    outs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for i, out in enumerate(outs):              # whole logs beside the run, for a failure's post-mortem
      with open(f"{two}.{stage}.process{i}.log", "w") as f:
        f.write(out)
    if any(p.returncode != 0 for p in procs):      # every process's log: the first to fail may be either
      raise AssertionError("\n".join(f"process {i} exited {p.returncode}:\n" + without_thread_dumps(out)[-3000:]
                                      for i, (p, out) in enumerate(zip(procs, outs))))
    return outs

  procs = launch()
  deadline = time.time() + 600
  while not (os.path.exists(os.path.join(two, "metrics.jsonl")) and max(losses(two), default=0) >= 3):
    if any(p.poll() is not None for p in procs):
      finish(procs, "first")                   # a crash shows its log
      raise AssertionError("training ended before the signal")
    assert time.time() < deadline, "no step 3 in 600 s"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)        # process 1 only
  outs = finish(procs, "first")
  saved = [re.search(r"preempted at step (\d+): saving", out) for out in outs]
  assert all(saved), [out[-1500:] for out in outs]
  stop = {int(m.group(1)) for m in saved}
  assert len(stop) == 1 and stop.pop() < 24
  assert max(int(d) for d in os.listdir(os.path.join(two, "checkpoints")) if d.isdigit()) < 24
  finish(launch(), "resumed")                 # the same command resumes
  want, got = losses(one), losses(two)
  assert sorted(got) == sorted(want) == list(range(1, 25))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  """The README's main command, exactly as written (1,500 steps, from nothing: synthetic data,
  its VAE, training, the validation summary)."""
  workdir = str(tmp_path_factory.mktemp("readme") / "tiny")
  out = subprocess.run([sys.executable, "-m", "mgie_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stderr


def test_readme_main_command_learns_the_edits_and_reports_validation(readme_run):
  workdir, log = readme_run
  rows = losses(workdir)
  assert max(rows) == 1500 and "1500" in os.listdir(os.path.join(workdir, "checkpoints"))
  first, last = rows[min(rows)], rows[1500]
  assert last[1] < first[1] / 5 and last[2] < first[2] / 2, (first, last)
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    v = json.loads(f.readlines()[-1])
  line = next(l for l in log.splitlines() if "validation (test, 20 examples, step 1500): L1" in l)
  print(line)
  assert f"L1 {v['l1']:.4f} vs copy-input {v['copy_input_l1']:.4f}" in line
  # Whether the README's seed beats copying the input depends on the CPU: XLA's kernels round
  # differently per machine and send the training elsewhere. Measured: L1 0.0605-0.0726 against
  # copy's 0.0896 on five x86 boxes (AVX-512, AVX2), 0.0969 on an AVX2 AMD EPYC box and 0.1021 with
  # XLA limited to AVX (one recolour written as a background edit); edit_acc 0.10-0.16. Runs that
  # learned nothing score keep_acc <= 0.3 and L1 >= 2.6x copy's, one that only reconstructs its
  # input edit_acc ~0: the bounds below hold on every machine measured and fail for those.
  assert v["exp_token_acc"] > 0.85, v                # the expressive instructions are learned
  assert v["keep_acc"] > 0.6, v                      # what the edit must not touch is kept
  assert v["edit_acc"] > 0.05, v                     # what it must change is painted (copying: 0)
  assert v["l1"] < 1.25 * v["copy_input_l1"], v      # within reach of copying, far from a failed run
  # One row per example: what the MLLM wrote and each score, the summary their mean.
  with open(os.path.join(workdir, "eval_examples", "step_0001500.jsonl")) as f:
    per = [json.loads(l) for l in f]
  assert len(per) == 20 and len({r["key"] for r in per}) == 20
  assert all(r["instruction"] and isinstance(r["expressive"], str) for r in per), per[0]
  for m in ("l1", "copy_input_l1", "exp_token_acc"):
    assert abs(np.mean([r[m] for r in per]) - v[m]) < 1e-6, m
  events = [f for f in os.listdir(os.path.join(workdir, "tensorboard")) if "tfevents" in f]
  assert events and b"eval/l1" in open(os.path.join(workdir, "tensorboard", events[0]), "rb").read()
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_0000750.png", "step_0001500.png"]


def test_readme_run_trains_a_vae_that_reconstructs_and_loads_it_frozen(readme_run):
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.convert.pretrained import load_vae
  workdir, log = readme_run
  folder = os.path.join(workdir, "data", "vae")
  with open(os.path.join(folder, "training.json")) as f:
    report = json.load(f)
  assert report["psnr_test_db"] > 25.0, report      # held-out synthetic images (measured 26.1-27.5 dB)
  run = workdir_lib.load(workdir, 1500, devices=jax.devices()[:1])
  assert "vae" not in run.params                     # frozen: not trained, not checkpointed
  from flax import nnx
  params = lambda m: flat(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  saved, used = params(load_vae(folder, dict(dtype="float32", param_dtype="float32"))), params(run.model.vae)
  assert saved.keys() == used.keys() and all(np.array_equal(saved[k], used[k]) for k in saved)


def test_readme_edit_command_edits_the_test_image_it_names_and_photos_at_their_size(readme_run, tmp_path):
  import re
  import shlex
  from PIL import Image
  from skimage import data as skdata
  workdir, _ = readme_run
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  command = re.search(r"^python -m mgie_jax\.edit --workdir=/tmp/mgie_tiny \\\n(?:.*\\\n)*.*$", readme, re.M).group(0)
  argv = [a.replace("/tmp/mgie_tiny", workdir) for a in shlex.split(command.replace("\\\n", " "))]
  argv = [a if a != "edited.png" else str(tmp_path / "edited.png") for a in argv]
  image = next(a for a in argv if a.endswith(".jpg"))
  assert os.path.isfile(image), image                # the run wrote the test image the README names
  out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env(), check=True, capture_output=True,
                       timeout=600)
  assert "expressive instruction:" in out.stdout.decode() and "checkpoint step 1500" in out.stdout.decode()
  assert Image.open(tmp_path / "edited.png").size == Image.open(image).size
  # A photograph comes back at its own size.
  photo = str(tmp_path / "astronaut.jpg")
  Image.fromarray(skdata.astronaut()[:, :384]).save(photo)
  subprocess.run([sys.executable, "-m", "mgie_jax.edit", f"--workdir={workdir}", f"--image={photo}",
                  "--instruction=make the background blue", f"--out={tmp_path / 'astronaut.png'}",
                  "--steps=10"], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
  edited = Image.open(tmp_path / "astronaut.png")
  assert edited.size == (384, 512) and edited.mode == "RGB"


def test_inference_loader_reads_parameters_only_and_writes_nothing(killed_and_resumed):
  from mgie_jax.inference import pipeline as inference
  from mgie_jax.run import workdir as workdir_lib
  from mgie_jax.diffusion import NoiseSchedule
  straight = killed_and_resumed[0]
  before = sorted(str(p) for p in __import__("pathlib").Path(straight).rglob("*"))
  workdir, step = workdir_lib.locate(straight)
  assert step == 14
  run = workdir_lib.load(workdir, step, devices=jax.devices()[:1])
  c = run.config
  setup = make_setup(c, c.data.tokenizer, devices=jax.devices()[:1])
  full = Checkpointer(straight, every=1, keep=5).restore(setup.abstract_state(), None, step)
  # These runs keep an EMA of the weights (train_cmd): that is what inference reads.
  a, b = flat(full.ema), flat(run.params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert not all(np.array_equal(a[k], v) for k, v in flat(full.params).items())
  from mgie_jax.run.workdir import TrainedSource
  unet = TrainedSource(straight, step).restore_module("unet")                 # and so does export
  assert np.array_equal(unet["conv_in"]["kernel"], a["['unet']['conv_in']['kernel']"])
  # The run killed and resumed carries its EMA through the restart exactly.
  resumed = Checkpointer(killed_and_resumed[1], every=1, keep=5).restore(setup.abstract_state(), None, step)
  r = flat(resumed.ema)
  assert all(np.allclose(a[k], r[k], rtol=1e-5, atol=1e-7) for k in a)
  # The sampler runs on the noise schedule the run was trained with.
  assert inference.default_sampler(run.model).schedule == NoiseSchedule(**c.model.noise)
  after = sorted(str(p) for p in __import__("pathlib").Path(straight).rglob("*"))
  assert after == before
