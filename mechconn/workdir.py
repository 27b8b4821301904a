"""What a job keeps in its workdir: its config, JSON results and JSON-lines metrics.

The rules, so that nothing a user saved is lost:
  - a workdir belongs to one config and one live job at a time (`claim`: a
    lock naming its holder; a config.json is mechconn's only when it carries
    the mark mechconn writes (`FORMAT_KEY`), and one that is not this task's is
    never written over; a different config is refused, naming the differing
    keys, unless told to overwrite, which deletes only the task's own `Layout`
    and is refused while a checkpoint step holds anything orbax did not write,
    since the new run would resume from it);
  - a launch that fails before writing any output takes its config.json back;
  - JSON files are written to a temporary file and renamed into place;
  - metrics are JSON lines, one object per log step with a "step" key (read
    them with `read_metrics`, `pandas.read_json(path, lines=True)` or plain
    json); a resumed run first drops the lines past its restored step, so the
    file of a killed-and-resumed run equals that of an uninterrupted one.
"""

from collections.abc import Callable, Iterator, Mapping
import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
from typing import Any

from absl import logging
from flax import traverse_util

from mechconn.lock import LOCK_FILE, WorkdirBusyError, lock  # pylint: disable=unused-import

CONFIG_FILE = "config.json"
# The mark mechconn writes into every config.json it records: a config.json without it is
# another program's (even with a "task" key), unless it is one of the runs recorded before
# the mark, recognised by its task and its whole top-level layout (`is_mechconn_config`).
FORMAT_KEY = "mechconn_format"
FORMAT_VERSION = 1
METRICS_FILE = "metrics.jsonl"
# What orbax writes in a checkpoint directory: '<step>' and its temporaries, holding
# only these entries (a step directory holding anything else is never deleted).
CHECKPOINT_ENTRY = re.compile(r"\d+(\.orbax-checkpoint-tmp(-\d+)?)?")
ORBAX_STEP_ENTRIES = {"default", "_CHECKPOINT_METADATA", "commit_success.txt"}
# Names in orbax's (OCDBT) item directory, at any depth (anything else there is a user's).
ORBAX_ITEM_ENTRY = re.compile(r"_sharding|_METADATA|_CHECKPOINT_METADATA|commit_success\.txt|"
                              r"manifest\.ocdbt|d|array_metadatas|(ocdbt\.)?process_\d+|"
                              r"[0-9a-f]{32}")


def config_to_dict(config: Any) -> dict:
  """A plain, JSON-compatible dict of a ConfigDict (or a dict)."""
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(config_dict))


def flatten(d: dict) -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  return traverse_util.flatten_dict(d, sep=".")


def _unchanged(recorded: dict, current: dict | None = None) -> dict:
  del current  # the exact vocabulary reads every recorded config as it is
  return recorded


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """How configs recorded by earlier versions read today; given by the code that owns the
  fields (`mechconn.tasks.records.VOCABULARY`), so that this module knows none.

  Attributes:
    upgrade: (recorded, current config) -> the recorded config in today's fields.
    renamed_tasks: {old task name: today's}; a run recorded under an old name is
      that task's, but a different config of it.
    uncompared: fields (last dotted part) that never change a run's numbers.
  """

  upgrade: Callable[[dict, dict | None], dict] = _unchanged
  renamed_tasks: Mapping[str, str] = dataclasses.field(default_factory=dict)
  uncompared: tuple[str, ...] = ()

  def task_of(self, recorded: dict) -> str | None:
    """The task a recorded config names, under today's name (None: it names none)."""
    task = recorded.get("task")
    return self.renamed_tasks.get(task, task) if isinstance(task, str) else None


EXACT = Vocabulary()  # every field compared, as recorded


def config_differences(old: dict, new: dict, vocabulary: Vocabulary = EXACT) -> list[str]:
  """Dotted keys whose values differ between a recorded config and a current one (sorted).

  The recorded one is read in today's fields (`vocabulary.upgrade`); fields that
  never change numbers (`vocabulary.uncompared`) and mechconn's mark (`FORMAT_KEY`,
  also where a recorded input's config carries it) are not compared. Lists of
  dicts (e.g. the curves an evaluation read) are compared item by item, as
  `<key>.<index>`.
  """
  old, new = _indexed(old), _indexed(json.loads(json.dumps(new)))
  old, new = flatten(vocabulary.upgrade(old, new)), flatten(new)
  skipped = set(vocabulary.uncompared) | {FORMAT_KEY}
  return sorted(k for k in set(old) | set(new)
                if old.get(k, _MISSING) != new.get(k, _MISSING)
                and k.rpartition(".")[2] not in skipped)


def _indexed(value: Any) -> Any:
  """`value` with every list of dicts as a dict keyed by position ('0', '1', ...)."""
  if isinstance(value, dict):
    return {k: _indexed(v) for k, v in value.items()}
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    return {str(i): _indexed(v) for i, v in enumerate(value)}
  return value


_MISSING = object()


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise FileExistsError(f"{path} exists but is not readable JSON ({e}); mechconn does not "
                          "write into a directory it cannot read: use another --workdir. "
                          "Nothing was changed.") from e


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a task writes into its workdir: the only things `--overwrite` deletes.

  Paths are relative to the workdir; patterns are `glob` patterns.

  Attributes:
    files: files mechconn wrote (metrics, results, figures).
    checkpoint_dirs: orbax checkpoint directories; only their step entries
      ('<step>' and '<step>.orbax-checkpoint-tmp-<time>' holding nothing but
      what orbax writes) are deleted, and the directory itself only when
      nothing else is left in it.
  """

  files: tuple[str, ...] = ()
  checkpoint_dirs: tuple[str, ...] = ()

  def existing(self, workdir: str) -> list[str]:
    """The paths of this layout present in `workdir` (files and checkpoint steps)."""
    return self._walk(workdir, remove=False)

  def clear(self, workdir: str) -> list[str]:
    """Deletes this layout's files and checkpoint steps from `workdir`; returns what went."""
    return self._walk(workdir, remove=True)

  def foreign_steps(self, workdir: str) -> dict[str, list[str]]:
    """{checkpoint step directory: its entries orbax did not write} (a user's files, a
    workdir nested there): `clear` keeps these, so a run would resume from them."""
    found = {}
    for path in self._steps(workdir):
      if not os.path.isdir(path):
        continue
      foreign = sorted(set(os.listdir(path)) - ORBAX_STEP_ENTRIES)
      item = os.path.join(path, "default")
      for root, dirs, files in os.walk(item) if os.path.isdir(item) else ():
        foreign += [os.path.relpath(os.path.join(root, e), path) for e in sorted(dirs + files)
                    if not ORBAX_ITEM_ENTRY.fullmatch(e)]
      if foreign:
        found[path] = foreign
    return found

  def _steps(self, workdir: str) -> list[str]:
    return [os.path.join(directory, entry)
            for directory in _matches(workdir, self.checkpoint_dirs) if os.path.isdir(directory)
            for entry in sorted(os.listdir(directory)) if CHECKPOINT_ENTRY.fullmatch(entry)]

  def _walk(self, workdir: str, remove: bool) -> list[str]:
    found = []
    for path in _matches(workdir, self.files):
      if os.path.isfile(path) or os.path.islink(path):
        found.append(path)
        if remove:
          os.remove(path)
    foreign = self.foreign_steps(workdir)
    for path in self._steps(workdir):
      if path in foreign:  # `claim` refuses to overwrite while these exist
        logging.warning("Keeping %s: it holds %s, which orbax did not write.", path,
                        foreign[path][:5])
        continue
      found.append(path)
      if remove and os.path.isdir(path):
        shutil.rmtree(path)
      elif remove:
        os.remove(path)
    if remove:
      for directory in _matches(workdir, self.checkpoint_dirs):
        with contextlib.suppress(OSError):  # not empty: something not ours is there
          os.rmdir(directory)
    return found


def _matches(workdir: str, patterns: tuple[str, ...]) -> list[str]:
  return sorted({p for pattern in patterns
                 for p in glob.glob(os.path.join(glob.escape(workdir), pattern))})


@contextlib.contextmanager
def claim(workdir: str, config_dict: dict, layout: Layout, *, overwrite: bool = False,
          vocabulary: Vocabulary = EXACT) -> Iterator[None]:
  """Locks the workdir and records `config_dict` as its config for the duration of a run.

  Resuming (the same config recorded) is allowed; everything else that could
  lose a user's data is refused before anything is written:
    - a workdir held by a live job (see `lock`), or one mechconn cannot write;
    - a config.json that is not a mechconn config of this task (e.g. another
      project's model directory, even one with a "task" key: see
      `is_mechconn_config`), with or without `overwrite`;
    - a different config of this task, unless `overwrite`; then only the files
      of `layout` are deleted (never anything else) before the new config is
      recorded; and not while a checkpoint step of `layout` holds anything
      orbax did not write (it would be kept, and the new run resume from it);
    - files named like `layout`'s outputs without a config.json saying that
      mechconn wrote them, with or without `overwrite`.

  The config is recorded with mechconn's mark (`FORMAT_KEY`). When the run
  raises before any output of `layout` exists in a workdir that had no
  config.json, that config.json is removed again: a refused launch leaves no
  record, so the corrected command is not refused as a different config.
  A recorded config is read in today's fields and fields that do not change
  results may differ (`vocabulary`). Process 0
  alone claims in a multi-host job (see `runner.claimed`).

  Args:
    workdir: the job's directory (created if missing).
    config_dict: the job's config as a plain dict, with its 'task'.
    layout: what the task writes there.
    overwrite: replace a run of a different config.
    vocabulary: how configs recorded by earlier versions read today.

  Raises:
    FileExistsError: the workdir holds another config or foreign files.
    PermissionError: the workdir (or its checkpoint directory) is not writable.
    WorkdirBusyError: another job holds the workdir.
  """
  # Checked before locking, so that nothing (not even a lock file) is written into
  # a directory that is refused; checked again under the lock, where it counts.
  check_claim(workdir, config_dict, layout, overwrite=overwrite, vocabulary=vocabulary)
  path = os.path.join(workdir, CONFIG_FILE)
  with lock(workdir):
    fresh = not os.path.exists(path)
    if check_claim(workdir, config_dict, layout, overwrite=overwrite, vocabulary=vocabulary):
      removed = layout.clear(workdir)
      logging.warning("--overwrite: removed %d outputs of the previous run in %s: %s",
                      len(removed), workdir, removed[:10])
    write_json_atomic(path, {**config_dict, FORMAT_KEY: FORMAT_VERSION})
    try:
      yield
    except BaseException:
      if fresh and not layout.existing(workdir):  # nothing recorded: take the claim back
        os.remove(path)
      raise


def is_mechconn_config(recorded: Any, config_dict: dict,
                       vocabulary: Vocabulary = EXACT) -> bool:
  """Whether a config.json's content was written by mechconn for `config_dict`'s task.

  It carries mechconn's mark (`FORMAT_KEY`), or it is a run recorded before the
  mark: this task, and, read in today's fields (`vocabulary.upgrade`), exactly
  the top-level keys this task's config has. A "task" key alone is not enough.
  """
  if not isinstance(recorded, dict) or vocabulary.task_of(recorded) is None:
    return False
  if FORMAT_KEY in recorded:
    return recorded[FORMAT_KEY] == FORMAT_VERSION
  if vocabulary.task_of(recorded) != config_dict.get("task"):
    return False
  if recorded["task"] in vocabulary.renamed_tasks:  # the old name: a different config
    return True
  keys = set(vocabulary.upgrade(recorded, config_dict)) - {"inputs"}
  return keys == set(config_dict) - {"inputs"}


def _check_writable(workdir: str, layout: Layout) -> None:
  """Raises when the workdir (or its nearest existing parent) or a checkpoint directory is
  not a writable directory: a run would otherwise fail late (after training, in orbax)."""
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  for path in [parent] + _matches(workdir, layout.checkpoint_dirs):
    if not os.path.isdir(path):
      raise FileExistsError(f"{path} is a file, not a directory (the run's "
                            f"{'checkpoints' if path != parent else 'workdir'}); use another "
                            "--workdir, or move it away. Nothing was changed.")
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable by this user, and the run would write "
                            "there; make it writable or use another --workdir. Nothing was "
                            "changed.")


def check_claim(workdir: str, config_dict: dict, layout: Layout, *, overwrite: bool,
                vocabulary: Vocabulary = EXACT) -> bool:
  """Raises as `claim` would, reading only; True when `claim` would clear an old run."""
  if not workdir:
    raise ValueError("The workdir is empty: give the directory for this run's results "
                     "(e.g. --workdir=/tmp/run).")
  path = os.path.join(workdir, CONFIG_FILE)
  task = config_dict.get("task")
  _check_writable(workdir, layout)
  if os.path.exists(path):
    recorded = _read_json(path)
    recorded_task = vocabulary.task_of(recorded) if isinstance(recorded, dict) else None
    if not is_mechconn_config(recorded, config_dict, vocabulary) or recorded_task != task:
      mark = recorded.get(FORMAT_KEY) if isinstance(recorded, dict) else None
      what = ("a config.json that mechconn did not write" if mark is None or
              recorded_task is None else
              f"a run of another mechconn (its {FORMAT_KEY} is {mark!r}; this one writes "
              f"{FORMAT_VERSION})" if mark != FORMAT_VERSION else
              f"a mechconn {recorded['task']!r} run")
      raise FileExistsError(
          f"{workdir} holds {what}, not a {task!r} run (see {path}). mechconn does not write "
          "into it, with or without --overwrite: use another --workdir. Nothing was changed.")
    diff = config_differences(recorded, config_dict, vocabulary)
    if diff and not overwrite:
      raise FileExistsError(
          f"{workdir} holds a run of a different config (see {path}; differs in {diff}). "
          "Use a new --workdir, or pass --overwrite to delete that run's outputs. Nothing was "
          "overwritten.")
    stale = bool(diff)
    foreign = layout.foreign_steps(workdir) if stale else {}
    if foreign:
      step, entries = next(iter(foreign.items()))
      raise FileExistsError(
          f"--overwrite would keep {step}: it holds {entries[:5]}, which orbax did not write "
          f"({len(foreign)} such step director{'ies' if len(foreign) > 1 else 'y'}: "
          f"{sorted(foreign)[:3]}), and the new run would resume from that step of the old "
          "one. Move them out of the checkpoint directory, then relaunch. Nothing was "
          "changed.")
  else:
    existing = layout.existing(workdir) if os.path.isdir(workdir) else []
    if existing:  # another program's files, or an older mechconn's: not ours to delete
      raise FileExistsError(
          f"{workdir} holds files named like this task's outputs ({existing[:3]}) but no "
          f"{CONFIG_FILE} saying mechconn wrote them, so mechconn neither writes over nor "
          "deletes them, with or without --overwrite: use another --workdir, or move them "
          "away. Nothing was changed.")
    stale = False
  return stale


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
