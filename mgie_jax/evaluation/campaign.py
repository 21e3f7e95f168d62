"""An evaluation campaign: a config (configs/eval/*.py) checked and resolved into editors x
settings x metrics before any model is loaded, run as sweeps over a benchmark's examples, and
summarised as a CSV, a markdown table and plots. `mgie_jax.evaluate` is the command.
"""

from __future__ import annotations

import json
import logging
import os

import jax
from etils import epath

from data_pipelines.synthetic import COLORS
from mgie_jax.core import cli, errors, hosts
from mgie_jax.evaluation import editors as ed
from mgie_jax.evaluation import metrics as metrics_lib
from mgie_jax.evaluation import report
from mgie_jax.evaluation.sweep import Results, Setting, Sweep, load_examples
from mgie_jax.run import workdir as workdir_lib
from mgie_jax.run.checks import check_dataset, check_folder

log = logging.getLogger("mgie_jax.evaluate")


def floats(text: str, name: str) -> list[float]:
  try:
    return [float(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise errors.BAD_OPTION(flag=f"--config.{name}", detail=f"{text!r} is not a list of numbers",
                            fix="give comma-separated numbers, e.g. 3,5,7.5") from None


def words(text: str) -> list[str]:
  return [x.strip() for x in str(text).split(",") if x.strip()]


def plan(c):
  """Everything checked and resolved before a model is loaded: (settings, editor specs, metrics)."""
  if not c.dataset.dir:
    raise errors.NOT_A_DATASET(name="config.dataset.dir", path="(empty)",
                               extra=", e.g. python -m data_pipelines.build magicbrush ...")
  check_dataset(c.dataset.dir, "config.dataset.dir", tuple(c.dataset.split.split("+")))
  if c.dataset.subset:
    _check_file(c.dataset.subset_file, "config.dataset.subset_file")
  modes = words(c.mode)
  if not modes or set(modes) - {"single", "multi"}:
    raise errors.BAD_OPTION(flag="--config.mode", detail=f"{c.mode!r}", fix="use single, multi or single,multi")
  names = words(c.metrics)
  unknown = [m for m in names if m not in metrics_lib.ALL]
  if unknown:
    raise errors.BAD_OPTION(flag="--config.metrics", detail=f"unknown metric(s) {', '.join(unknown)}",
                            fix=f"choose from {', '.join(metrics_lib.ALL)}")
  mm = c.metric_models
  need = {"clip_i": [("clip", mm.clip)], "clip_t": [("clip", mm.clip)], "dino": [("dino", mm.dino)],
          "clip_s_input": [("clip", mm.clip)], "clip_s_goal": [("clip", mm.clip)],
          "lpips": [("lpips", mm.lpips), ("lpips_heads", mm.lpips_heads)],
          "lpips_vgg": [("lpips_vgg", mm.lpips_vgg), ("lpips_vgg_heads", mm.lpips_vgg_heads)]}
  for m in names:
    for key, path in need.get(m, []):
      if not path:
        raise errors.BAD_OPTION(flag=f"--config.metric_models.{key}", detail=f"metric {m} needs it and it is empty",
                                fix="give the local folder / file (nothing is downloaded), or drop the metric")
      (check_folder if key in ("clip", "dino") else _check_file)(path, f"config.metric_models.{key}")
  if c.expressive not in ("written", "reference"):
    raise errors.BAD_OPTION(flag="--config.expressive", detail=f"{c.expressive!r}",
                            fix="use written (MGIE writes its own) or reference (the dataset's, teacher-forced)")
  if c.sample_steps < 1 or c.batch_size < 1:
    raise errors.BAD_OPTION(flag="--config.sample_steps / batch_size", detail="must be 1 or more", fix="use 1 or more")
  settings = [Setting(t, i, int(s), c.sampler, int(c.sample_steps), int(c.resolution))
              for t in floats(c.text_scales, "text_scales") for i in floats(c.image_scales, "image_scales")
              for s in floats(c.seeds, "seeds")]
  if not settings:
    raise errors.BAD_OPTION(flag="--config.text_scales", detail="the grid is empty", fix="give at least one value")
  editors = []
  for run in words(c.runs):
    steps = workdir_lib.saved_steps(workdir_lib.checkpoint_dir(run))
    if not steps:
      raise errors.NO_CHECKPOINT(directory=workdir_lib.checkpoint_dir(run), option="--config.runs=<a trained workdir>")
    wanted = steps if c.steps == "all" else ([steps[-1]] if not words(c.steps) else [int(float(s)) for s in words(c.steps)])
    for step in wanted:
      workdir_lib.locate(run, None, step)
      editors.append(("run", run, step))
  if c.pretrained.mllm_pt or c.pretrained.llava:
    for key in ("llava", "sd"):
      check_folder(c.pretrained[key], f"config.pretrained.{key}")
    editors.append(("pretrained", c.pretrained.name, None))
  if c.ip2p:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
      check_folder(os.path.join(c.ip2p, sub), f"config.ip2p ({sub}/)")
    editors.append(("ip2p", c.ip2p, None))
  if c.copy_input:
    editors.append(("copy", "copy-input", None))
  return settings, editors, names, modes


def _check_file(path, name):
  if not epath.Path(path).is_file():
    raise errors.PRETRAINED_MISSING(name=name, path=path)


def load_editor(spec, c):
  kind, what, step = spec
  if kind == "copy":
    return ed.CopyInput()
  if kind == "ip2p":
    return ed.InstructPix2PixEditor("ip2p", what, resolution=c.resolution or 512)
  if kind == "run":
    run = workdir_lib.load(what, step, devices=jax.local_devices())   # hosts evaluate independently
    name = os.path.basename(os.path.normpath(str(what)))
    res = c.resolution or (512 if run.pretrained else run.config.data.resolution)
    return ed.MGIEEditor(name, run.model, run.tok, step=step, resolution=res, max_new_tokens=c.max_new_tokens,
                         mesh=run.mesh, text=c.expressive)
  # a pretrained MGIE (e.g. the release) from the full recipe's config and these folders
  model, tok, mesh = workdir_lib.load_release(c.recipe, c.pretrained, c.pretrained_dtype, devices=jax.local_devices())
  return ed.MGIEEditor(what, model, tok, resolution=c.resolution or 512, max_new_tokens=c.max_new_tokens,
                       mesh=mesh, text=c.expressive)


def check_references(examples, expressive: str) -> None:
  """expressive="reference" needs every example's reference expressive instruction."""
  missing = sum(1 for e in examples if not e.expressive)
  if expressive == "reference" and missing:
    raise errors.BAD_OPTION(flag="--config.expressive=reference",
                            detail=f"{missing} of {len(examples)} examples have no reference expressive instruction",
                            fix="build the dataset with its expressive annotations (expressive.json), or use written")


def select(examples, c):
  """The examples of `dataset.subset` (by `dataset.subset_file`: {key: {"subset": ...}}), or all."""
  if not c.dataset.subset:
    return examples
  table = json.loads(epath.Path(c.dataset.subset_file).read_text())
  keep = [e for e in examples if (table.get(e.key) or {}).get("subset") == c.dataset.subset]
  log.info("subset %r: %d of %d examples", c.dataset.subset, len(keep), len(examples))
  return keep


def write_reports(workdir, c, metric_names, metrics):
  rows = Results.read(workdir)
  metric_names = list(metric_names) + [m for m in ("exp_token_acc", "exp_exact") if any(m in r for r in rows)]
  summary = report.summarize(rows, metric_names)
  report.write_csv(summary, workdir / "summary.csv")
  lower = [m.name for m in metrics if m.lower_is_better]
  (workdir / "table.md").write_text(report.markdown(summary, metric_names, f"{c.dataset.name} ({c.dataset.split})",
                                                    lower))
  plots = workdir / "plots"
  plots.mkdir(parents=True, exist_ok=True)
  x, y = (words(c.plot) + ["", ""])[:2]
  made = []
  if x in metric_names and y in metric_names and report.plot_tradeoff(summary, x, y, plots / f"{y}_vs_{x}.png"):
    made.append(f"{y}_vs_{x}.png")
  for m in metric_names:
    if report.plot_steps(summary, m, plots / f"{m}_vs_step.png"):
      made.append(f"{m}_vs_step.png")
  if report.plot_clip_s(summary, plots / "clip_s.png"):
    made.append("clip_s.png")
  print((workdir / "table.md").read_text())
  print(f"summary: {workdir / 'summary.csv'}; plots: {', '.join(made) or 'none'} in {plots}")


def evaluate(c, workdir: str) -> None:
  """Plan (every check), then sweep each editor in turn; process 0 writes the reports."""
  settings, specs, metric_names, modes = plan(c)
  workdir = epath.Path(workdir)
  lead = jax.process_index() == 0
  examples = select(load_examples(c.dataset.dir, c.dataset.split, c.dataset.limit), c)
  check_references(examples, c.expressive)
  mm = c.metric_models
  palette = COLORS if set(metric_names) & set(metrics_lib.PALETTE) else None   # the synthetic data's
  metrics = metrics_lib.make_metrics(metric_names, clip=mm.clip, dino=mm.dino, palette=palette,
                                     lpips_alex=(mm.lpips, mm.lpips_heads) if mm.lpips else (),
                                     lpips_vgg=(mm.lpips_vgg, mm.lpips_vgg_heads) if mm.lpips_vgg else ())
  results = Results(workdir, jax.process_index())
  images_dir = workdir / "images" if c.save_images else None
  sweeps = [Sweep([], settings, metrics, results, c.batch_size, mode, images_dir, jax.process_index(),
                  jax.process_count()) for mode in modes]
  per_editor = [1 if s[0] == "copy" else len(settings) for s in specs]
  total = sum(sw.units(sw._mine(examples), per_editor) for sw in sweeps)
  log.info("%d examples of %s/%s, %d editors, %d settings, modes %s: %d edits on this host",
           len(examples), c.dataset.name, c.dataset.split, len(specs), len(settings), ",".join(modes), total)
  bar = cli.progress(total, "evaluate", lead)
  with cli.log_through(cli.interactive(lead)):
    for spec in specs:
      editor = load_editor(spec, c)
      for sw in sweeps:
        sw.editors = [editor]
        sw.run(examples, bar)
      del editor
  bar.close()
  hosts.barrier("evaluation rows written")
  if lead:
    write_reports(workdir, c, metric_names, metrics)
