"""Recorded configs read in today's vocabulary: the one place old runs' fields are upgraded.

A run records its config (config.json, and with each checkpoint). When a
later mechconn reads it (to resume, to compare, or to load a finished run as
an input), `upgrade` brings it to today's fields:
  - fields renamed since move to their new place (`RENAMED_FIELDS`, per task);
  - fields removed since are dropped (`REMOVED_FIELDS`);
  - fields added since get the value that does what the recorded run did
    (`ADDED_FIELDS`, matched on the dotted key's end); `ANY` marks a setting
    no recorded run used (it takes the current config's value).
`VOCABULARY` hands these rules to `mechconn.workdir` (claims) and
`mechconn.loop` (resumes), which know no task field.
"""

import copy
from typing import Any

from mechconn import workdir as workdir_lib

ANY = object()
# Fields added after runs were recorded -> what those runs did. A callable reads the run's
# (flattened) config: eval_path's activation sites mattered only to activation matching.
ADDED_FIELDS = {
    "model.dtype": "float32", "endpoint_model.dtype": "float32", "data.pipeline": "auto",
    "kwargs.weight_init": "default", "data.test_cue_proportion": 1.0,
    "path.bn_variance": "biased", "cbft.cue_set": "all_cued", "cbft.barrier_loss": True,
    "cbft.schedule_per": "update", "scratch.learning_rate": ANY,
    "allow_identical_endpoints": False, "optimizer.warmup_steps": 0,
    "per_device_batch_size": 0, "dry_run": False,
    "activation_sites": lambda run: (
        "module_outputs" if run.get("align") == "activation" else ANY)}
# Fields renamed since, per task: old dotted key -> new dotted key.
RENAMED_FIELDS = {"theory": {"num_t": "path.num_t", "seeds": "num_seeds"},
                  "finetune": {"test_cue_proportion": "data.test_cue_proportion"}}
# Fields removed since (matched on the dotted key's end): they never changed a run's numbers.
REMOVED_FIELDS = ("finetune.eval_batch_size", "finetune.eval_every_steps")
# Tasks recorded under an older name: their workdirs hold a different config of the new one.
RENAMED_TASKS = {"linear_barrier": "quickstart"}
# Fields that never change a run's numbers: a relaunch may change them (e.g. to point at
# the data after a first launch failed to find it).
UNCOMPARED_FIELDS = ("progress", "data_dir", "download", "pipeline", "dry_run")


def _matches(key: str, suffix: str) -> bool:
  return key == suffix or key.endswith("." + suffix)


def _added_value(key: str, run: dict, current: dict) -> Any:
  """What a run recorded without `key` did; `_NOT_ADDED` when `key` was not added since."""
  value = next((v for suffix, v in ADDED_FIELDS.items() if _matches(key, suffix)), _NOT_ADDED)
  value = value(run) if callable(value) else value
  return current.get(key, _NOT_ADDED) if value is ANY else value


_NOT_ADDED = object()


def upgrade(recorded: dict, current: dict | None = None) -> dict:
  """`recorded` (a config dict of any task) in today's fields.

  `current` (today's config of the same job, when comparing with one) names the
  fields to fill; without it every added field of a section the run has is
  filled (for reading a finished `train` run as an input).

  Examples:
    >>> upgrade({"task": "train", "model": {"name": "mlp", "kwargs": {}}})["model"]["dtype"]
    'float32'
  """
  out = copy.deepcopy(recorded)
  for old, new in RENAMED_FIELDS.get(recorded.get("task"), {}).items():
    if _has(out, old) and not _has(out, new):
      _set(out, new, _pop(out, old))
  for key in list(workdir_lib.flatten(out)):
    if any(_matches(key, r) for r in REMOVED_FIELDS):
      _pop(out, key)
  flat = workdir_lib.flatten(out)
  current_flat = workdir_lib.flatten(current) if current is not None else {}
  wanted = current_flat if current is not None else _fields_of_sections(flat)
  for key in wanted:
    if key not in flat:
      value = _added_value(key, flat, current_flat)
      if value is not _NOT_ADDED:
        _set(out, key, value)
  return out


def _fields_of_sections(flat: dict) -> list[str]:
  """Every added field with a fixed value whose section the run has."""
  sections = {k.rpartition(".")[0] for k in flat}
  out = []
  for suffix, value in ADDED_FIELDS.items():
    parent, _, name = suffix.rpartition(".")
    if value is ANY or callable(value) or not parent or parent == "kwargs":
      continue
    out += [f"{s}.{name}" for s in sections if s == parent or s.endswith("." + parent)]
  return out


def _has(d: dict, key: str) -> bool:
  *parents, name = key.split(".")
  for p in parents:
    d = d.get(p)
    if not isinstance(d, dict):
      return False
  return name in d


def _set(d: dict, key: str, value: Any) -> None:
  *parents, name = key.split(".")
  for p in parents:
    d = d.setdefault(p, {})
  d[name] = value


def _pop(d: dict, key: str) -> Any:
  *parents, name = key.split(".")
  for p in parents:
    d = d[p]
  return d.pop(name)


VOCABULARY = workdir_lib.Vocabulary(upgrade=upgrade, renamed_tasks=RENAMED_TASKS,
                                    uncompared=UNCOMPARED_FIELDS)
