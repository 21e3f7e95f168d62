"""Mistakes a user can make, each with one line that says what is wrong and what to do.

Commands raise `UserError`; `mgie_jax.core.cli` prints its one line to stderr and exits with code 2
(a traceback only with --verbose). Every message is a `Problem` in `CATALOGUE`, so the README's
"Common errors" section is generated from the same text (`python -m mgie_jax.core.errors`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re


class UserError(Exception):
  """A mistake the user can fix; `str(e)` is one line."""

  def __init__(self, code: str, message: str):
    self.code = code
    super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Problem:
  code: str
  what: str       # str.format template: what is wrong
  fix: str        # str.format template: what to do
  doc: str = ""   # for the README when `fix` is computed at the call site

  def __call__(self, **fields) -> UserError:
    text = f"{self.what.format(**fields)}; {self.fix.format(**fields)}"
    return UserError(self.code, " ".join(text.split()))


CATALOGUE: list[Problem] = []


def _problem(code, what, fix, doc="") -> Problem:
  p = Problem(code, what, fix, doc)
  CATALOGUE.append(p)
  return p


# --- flags and configs ---------------------------------------------------------------------------
CONFIG_KEY = _problem("config_key", "{flag}: the config has no key {key!r}",
                      "valid names near it: {nearest}")
FLAG_VALUE = _problem("flag_value", "{flag}: {detail}", "see --helpfull for the flag's type")
FLAG_MISSING = _problem("flag_missing", "{detail}", "see --helpfull for the command's flags")
CONFIG_FILE = _problem("config_file", "--config {path}: {detail}",
                       "name a Python file with get_config(), e.g. configs/tiny.py")

# --- meshes and batches --------------------------------------------------------------------------
MESH_DEVICES = _problem("mesh_devices", "config.mesh {mesh} does not fit the {devices} devices present",
                        "make data x fsdp x tensor equal the device count, or set one of them to -1")
BATCH_MESH = _problem("batch_mesh",
                      "{name} {batch} does not divide over the mesh's batch axes (data x fsdp = {ways})",
                      "use a multiple of {ways}, e.g. {suggestion}")
BATCH_HOSTS = _problem("batch_hosts", "{name} {batch} does not divide over {hosts} processes",
                       "use a multiple of {hosts}")
GRAD_ACCUM = _problem("grad_accum", "train.batch_size {batch} does not split into train.grad_accum={accum} "
                      "micro-batches that divide over the mesh's batch axes ({ways})",
                      "make batch_size a multiple of grad_accum x {ways}")

# --- data ----------------------------------------------------------------------------------------
NOT_A_DATASET = _problem("not_a_dataset", "{name}={path} holds no built dataset (no dataset_info.json)",
                         "build one with `python -m data_pipelines.build ...` and pass the version folder it "
                         "prints (e.g. .../ipr2pr/folder/1.0.0){extra}")
NO_SPLIT = _problem("no_split", "the dataset at {path} has no {split!r} split (it has {splits})",
                    "choose one of those splits or rebuild the dataset")
NO_TOKENIZER = _problem("no_tokenizer", "{name}={path} has no tokenizer.model",
                        "point it at a folder with LLaMA's SentencePiece tokenizer.model "
                        "(a LLaVA folder holds one)")
SOURCE_MISSING = _problem("source_missing", "{flag} {path} does not exist or is not a folder",
                          "give the folder of the source release")
FOLDER_MISSING = _problem("folder_missing", "{flag} {path} does not exist or is not a folder", "{fix}")
NOT_A_RELEASE = _problem("not_a_release", "{path} is not {what}",
                         "point {flag} at the folder that holds {needs}")
SOURCE_CHANGED = _problem("source_changed", "{dataset} was built from {old}, not from {new}",
                          "pass --overwrite to rebuild it (the old copy is kept until the new one is "
                          "complete), or choose another --data_dir")
EXPRESSIVE_CHOICE = _problem("expressive_choice", "no --expressive file was given: every target would be "
                             "the terse instruction, which trains the LLM to echo its input",
                             "pass --expressive FILE (MGIE's expressive-instruction JSON), or "
                             "--missing_expressive=instruction to accept the terse text as the target")
BAD_JSON = _problem("bad_json", "{flag} {path}: {detail}", "{fix}", "says what the file must hold")
PRETRAINED_MISSING = _problem("pretrained_missing", "{name}={path} is not a local folder",
                              "give the folder written by save_pretrained (nothing is downloaded)")

# --- images and text -----------------------------------------------------------------------------
IMAGE_MISSING = _problem("image_missing", "{flag} {path} does not exist", "give the path of an image file")
IMAGE_NOT_FILE = _problem("image_not_file", "{flag} {path} is a folder, not an image file",
                          "give the path of an image file")
IMAGE_UNREADABLE = _problem("image_unreadable", "{flag} {path} is not a readable image ({detail})",
                            "give a JPEG, PNG or other image PIL can open")
EMPTY_INSTRUCTION = _problem("empty_instruction", "--instruction is empty",
                             "say what to change, e.g. --instruction \"make the sky blue\"")
OUT_PATH = _problem("out_path", "{flag} {path}: {detail}", "{fix}",
                    "a file name with an image extension, in a folder you can write to")

# --- checkpoints ---------------------------------------------------------------------------------
NO_CHECKPOINT = _problem("no_checkpoint", "no checkpoint in {directory}",
                         "train first (python -m mgie_jax.train --workdir=...), or give {option}")
NO_STEP = _problem("no_step", "{directory} has no checkpoint step {step} (steps: {steps})",
                   "pass one of those steps")
CHECKPOINT_DAMAGED = _problem("checkpoint_damaged", "checkpoint step {step} in {directory} cannot be read "
                              "({detail})", "{fix}",
                              "lists the intact earlier steps and the flag that restores one "
                              "(`--config.checkpoint.restore_step=N` for train, `--step=N` for edit); "
                              "newer steps are moved to checkpoints.superseded/, not deleted")
CHECKPOINT_MISMATCH = _problem("checkpoint_mismatch", "checkpoint step {step} does not fit this model: "
                               "{detail}", "{fix}",
                               "names the parameters whose shapes differ and the config values the run "
                               "was saved with")
CHOOSE_CHECKPOINT = _problem("choose_checkpoint", "give exactly one of --workdir and --checkpoint",
                             "--workdir=W uses W's latest checkpoint, --checkpoint=W/checkpoints/N a given one")
RUN_LOCKED = _problem("run_locked", "another train command is writing to {workdir} ({holder})",
                      "wait for it to finish or stop it (Ctrl-C saves), or give another --workdir; a lock left "
                      "by a killed process on this machine is cleared at once, one from another machine "
                      "once its heartbeat is 5 minutes old")
FEATURES_MISSING = _problem("features_missing", "config.data.features={path} holds no frozen-feature cache "
                            "(no meta.json)", "make it with python -m data_pipelines.features --config=<this "
                            "config> (or leave config.data.features empty to encode the images every step)")
FEATURES_INCOMPLETE = _problem("features_incomplete", "the frozen-feature cache {path} lacks {missing} of its "
                               "{total} {split} shards", "finish it: re-run python -m data_pipelines.features with "
                               "the same flags (it resumes)")
FEATURES_STALE = _problem("features_stale", "the frozen-feature cache {path} was made {what}",
                          "make a cache for these models into another folder (--out) and point "
                          "config.data.features at it")
FEATURES_TRAINED = _problem("features_trained", "{detail} trains, but a frozen-feature cache holds the outputs "
                            "of the frozen VAE and CLIP tower", "keep them frozen (config.trainable), or leave "
                            "config.data.features empty")
BAD_OPTION = _problem("bad_option", "{flag}: {detail}", "{fix}", "says which values are valid")


def nearest(name: str, candidates, n: int = 3) -> str:
  found = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
  return ", ".join(found) if found else "(none close; see the config file)"


def markdown() -> str:
  """The README's "Common errors" table."""
  rows = ["| error | what it says | what to do |", "|---|---|---|"]
  cell = lambda s: re.sub(r"\{(\w+)(![rs])?\}", r"<\1>", " ".join(s.split())).replace("|", "\\|")
  for p in CATALOGUE:
    rows.append(f"| `{p.code}` | {cell(p.what)} | {cell(p.doc or p.fix)} |")
  return "\n".join(rows) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")
