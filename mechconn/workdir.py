"""What a job keeps in its workdir: its config, JSON results and JSON-lines metrics.

The rules, so that nothing a user saved is lost:
  - a workdir belongs to one config: a job refuses a workdir whose recorded
    config differs (naming the differing keys) unless told to overwrite;
  - JSON files are written to a temporary file and renamed into place;
  - metrics are JSON lines, one object per log step with a "step" key (read
    them with `read_metrics`, `pandas.read_json(path, lines=True)` or plain
    json); a resumed run first drops the lines past its restored step, so the
    file of a killed-and-resumed run equals that of an uninterrupted one.
"""

import json
import os
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def config_to_dict(config: Any) -> dict:
  """A plain, JSON-compatible dict of a ConfigDict (or a dict)."""
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(config_dict))


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Dotted keys whose values differ between two config dicts (sorted)."""
  old, new = flatten(old), flatten(json.loads(json.dumps(new)))
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise FileExistsError(f"{path} exists but is not readable JSON ({e}); use a new "
                          "--workdir. Nothing was overwritten.") from e


def check_result_compatible(path: str, config_dict: dict) -> None:
  """Refuses a result file (a JSON object with a "config") of a different config.

  Re-running the same config (same seeds, so the same numbers on this machine)
  may replace its own result; anything else would lose a user's result.
  """
  if not os.path.exists(path):
    return
  previous = _read_json(path)
  if not isinstance(previous, dict) or not isinstance(previous.get("config"), dict):
    raise FileExistsError(f"{path} exists but is not a readable mechconn result (no "
                          "'config'); use a new --workdir. Nothing was overwritten.")
  diff = config_differences(previous["config"], config_dict)
  if diff:
    raise FileExistsError(
        f"{path} already holds a result of a different config (differs in {diff}); "
        "use a new --workdir. Nothing was overwritten.")


def claim(workdir: str, config_dict: dict, *, overwrite: bool = False) -> bool:
  """Records `config_dict` as the workdir's config, or checks it matches.

  Args:
    workdir: the job's directory (created if missing).
    config_dict: the job's config as a plain dict.
    overwrite: allow a different recorded config; the caller then clears the
      old run's files (see `clear_run`).

  Returns:
    True when the workdir already held a run of a different config (only
    possible with overwrite=True), else False.

  Raises:
    FileExistsError: the workdir holds a run of a different config (the
      message names the differing keys) and overwrite is False.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  replaced = False
  if os.path.exists(path):
    diff = config_differences(_read_json(path), config_dict)
    if diff and not overwrite:
      raise FileExistsError(
          f"{workdir} holds a run of a different config (see {path}; differs in {diff}). "
          "Use a new --workdir, or pass --overwrite to delete that run. Nothing was "
          "overwritten.")
    replaced = bool(diff)
  write_json_atomic(path, config_dict)
  return replaced


def write_json_atomic(path: str, record: Any) -> None:
  """Writes JSON to a temporary file, then renames it over `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """The metrics lines of a JSON-lines file; a torn last line (killed run) is skipped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1:  # a write cut short by a kill
        break
      raise ValueError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
  return records


def truncate_metrics(path: str, last_step: int) -> None:
  """Keeps only the metrics lines with step <= last_step (atomically)."""
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r["step"] <= last_step]
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per line and flushes, so a kill loses at most one line."""

  def __init__(self, path: str, enabled: bool = True):
    self.path = path
    self._file = open(path, "a") if enabled else None

  def write(self, record: dict) -> None:
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
