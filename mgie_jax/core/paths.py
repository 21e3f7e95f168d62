"""Paths that may be local or remote (gs://, s3://, ... through etils.epath): workdirs, data and
pretrained folders. `file://` URLs are plain local paths. Remote files cannot be appended to:
`Appender` rewrites the whole (small) log file on each flush there."""

from __future__ import annotations

from etils import epath


def path(p) -> epath.Path:
  p = str(p)
  if p.startswith("file://"):
    p = p[len("file://"):]
  return epath.Path(p)


def is_local(p) -> bool:
  return "://" not in str(path(p))


class Appender:
  """A line-oriented log file (metrics.jsonl, eval.jsonl) under a local or remote workdir."""

  def __init__(self, file):
    self.file = path(file)
    self.local = is_local(self.file)
    self._lines = []
    if not self.local and self.file.exists():
      self._lines = self.file.read_text().splitlines(keepends=True)
    self.file.parent.mkdir(parents=True, exist_ok=True)

  def write(self, line: str) -> None:
    if self.local:
      with open(self.file, "a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.file.write_text("".join(self._lines))
