r"""Every claim of the paper as runs on embedded data, and the claims report made from them.

  python -m experiments.claims --command=run --claims=C13     # one claim (its runs, resumable)
  python -m experiments.claims --command=run --claims=C2,C3   # several
  python -m experiments.claims --command=run                  # every claim, from scratch on a CPU
  python -m experiments.claims --command=report               # docs/claims.md from finished runs

Commands (--command): `run` makes the runs of the claims named by --claims
(default: all), then writes the report; `report` writes the report of every
claim from the finished runs alone. --help lists the claims.

Runs live in --workdir (default workdir/claims), one directory per run, shared
between claims (C1..C5 read the same end points). A finished run is reused;
an unfinished one resumes. `report` reads only the runs' JSON records: a claim
whose runs are missing is reported as not run, never guessed. `--pairs=N`
(default 3) is how many seed pairs of end points C1..C5 use.

Nothing is lost to a typo: a bad flag or claim id is one line on stderr; `run`
refuses a --workdir that holds anything but claims runs (another task's run,
say), `report` one that is missing or empty, and neither replaces a report
(--out) that has results the new one lacks, or a file that is not a claims
report, unless given --overwrite.
"""

import dataclasses
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable

from absl import flags

from experiments import claims_exploration as exploration
from experiments import claims_measures as measures
from experiments.configs import eval_path as eval_path_config
from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import reproduce as reproduce_config
from experiments.configs import theory as theory_config
from experiments.configs import train as train_config
from mechconn import tasks
from mechconn import workdir as workdir_lib
from mechconn.tasks import runs


@dataclasses.dataclass(frozen=True)
class Run:
  """One task run of a claim: its directory under the claims workdir, config, record file."""

  name: str
  make_config: Callable[[str], object]  # claims workdir -> the locked config
  record_file: str


def _locked(config, overrides: dict):
  """The locked `config` with existing fields replaced ('section.field': value)."""
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[field] = value
  return config


def train_run(kind: str, pair: int) -> Run:
  """The cue (seed k) or no-cue (seed k + 1) end point of seed pair k (cpu presets)."""
  preset, seed = ("cpu_cue", pair) if kind == "cue" else ("cpu_nocue", pair + 1)
  return Run(f"train_{kind}_{pair}", lambda root: _locked(train_config.get_config(preset),
                                                           {"seed": seed}), "final_eval.json")


def curve_run(fit_on: str, pair: int) -> Run:
  def make(root):
    return _locked(fit_curve_config.get_config(f"cpu_{fit_on}"), {
        "start_workdir": os.path.join(root, f"train_cue_{pair}"),
        "end_workdir": os.path.join(root, f"train_nocue_{pair}")})
  return Run(f"curve_{fit_on}_{pair}", make, "curve.json")


# eval_path's alignments: activation matching as the official code (post-ReLU outputs), and
# on the module outputs before the ReLU (what mechconn matched before 2026-11-26).
EVALS = {"weight": {"align": "weight"}, "activation": {"align": "activation"},
         "activation_module_outputs": {"align": "activation",
                                       "activation_sites": "module_outputs"}}


def eval_run(kind: str, pair: int) -> Run:
  def make(root):
    return _locked(eval_path_config.get_config("cpu"), {
        **EVALS[kind], "start_workdir": os.path.join(root, f"train_cue_{pair}"),
        "end_workdir": os.path.join(root, f"train_nocue_{pair}"),
        "curve_workdirs": (os.path.join(root, f"curve_clean_{pair}"),
                           os.path.join(root, f"curve_cue_{pair}"))})
  return Run(f"eval_path_{kind}_{pair}", make, "eval_path.json")


def endpoint_runs(pairs: int, *, curves: bool = True, evals: tuple = ()) -> list[Run]:
  out = []
  for k in range(pairs):
    out += [train_run("cue", k), train_run("nocue", k)]
    if curves:
      out += [curve_run("clean", k), curve_run("cue", k)]
    out += [eval_run(kind, k) for kind in evals]
  return out


STUDY_METHODS = ("naive", "lp", "lp_ft", "dfr", "cbft", "scratch")


def variant_run(name: str, overrides: dict, cue_model: str | None = "train_cue_0") -> Run:
  """A study variant (reproduce.py:cpu with `overrides`); its cue model a claims run (or,
  with None, trained inside the study's own directory)."""
  def make(root):
    extra = {"cue_model_workdir": os.path.join(root, cue_model)} if cue_model else {}
    return _locked(reproduce_config.get_config("cpu"), {**overrides, **extra})
  return Run(name, make, "reproduce.json")


# The README's fine-tuning study (reproduce.py:cpu) with the scratch baseline, its cue model
# the claims' cue end point of pair 0.
STUDY = variant_run("study", {"finetune.methods": STUDY_METHODS})


def cue_model_run(name: str, overrides: dict) -> Run:
  return Run(name, lambda root: _locked(train_config.get_config("cpu_cue"), overrides),
             "final_eval.json")


NAIVE = {"finetune.methods": ("naive",)}
C6_RUNS = [train_run("cue", 0), STUDY,
           variant_run("study_naive_lr0.01", {**NAIVE, "finetune.naive.learning_rate": 0.01})]
C7_RUNS = [train_run("cue", 0), STUDY,
           variant_run("study_naive_lr0.1", {**NAIVE, "finetune.naive.learning_rate": 0.1}),
           cue_model_run("train_cue_p100", {"data.cue_proportion": 1.0}),
           variant_run("study_p100_naive", {**NAIVE, "train.data.cue_proportion": 1.0},
                       cue_model="train_cue_p100")]
CBFT = {"finetune.methods": ("cbft",)}
C11_RUNS = [train_run("cue", 0), STUDY,
            variant_run("study_cbft_no_barrier", {**CBFT, "finetune.cbft.barrier_loss": False}),
            variant_run("study_cbft_no_invariance",
                        {**CBFT, "finetune.cbft.invariance_weight": 0.0})]
C12_RUNS = [variant_run(f"study_p{p}", {"train.data.cue_proportion": p / 100}, cue_model=None)
            for p in (60, 70, 90)] + [
    train_run("cue", 0), STUDY,
    variant_run("study_dominoes", {"train.data.cue": "dominoes"}, cue_model=None)]


THEORY = Run("theory", lambda root: theory_config.get_config("default"), "theory.json")


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim: the paper's statement, the runs it needs, and how its record is measured."""

  id: str
  statement: str
  runs: Callable[[int], list[Run]]  # pairs -> runs
  measure: Callable[[dict, int], dict]  # ({run name: record}, pairs) -> measured, verdict
  figures: tuple[tuple[str, str], ...] = ()  # (run name, file) shown under its details


EVAL_FIGURE = (("eval_path_weight_0", "eval_path.png"),)
STUDY_FIGURES = (("study", "views.png"), ("study", "paths.png"))
CLAIMS = [
    Claim("C1", "Cue model: cue accuracy near 1, rand_img far above chance, rand_cue low; "
          "no-cue model: views equal, rand_img at chance.",
          lambda n: endpoint_runs(n, curves=False), measures.c1),
    Claim("C2", "The linear path between the cue and the no-cue model has a barrier on clean "
          "data.", lambda n: endpoint_runs(n, evals=("weight",)), measures.c2, EVAL_FIGURE),
    Claim("C3", "The barrier survives permutation alignment (weight and activation matching).",
          lambda n: endpoint_runs(n, evals=tuple(EVALS)), measures.c3,
          EVAL_FIGURE),
    Claim("C4", "A quadratic path fitted on clean data, and one fitted on fully cued data, has "
          "no barrier on its own data.", lambda n: endpoint_runs(n, evals=("weight",)),
          measures.c4, EVAL_FIGURE),
    Claim("C5", "Each quadratic path breaks on at least one view (no mechanistic "
          "connectivity).", lambda n: endpoint_runs(n, evals=("weight",)), measures.c5,
          EVAL_FIGURE),
    Claim("C6", "Naive FT (lr 0.001 and 0.01) stays linearly connected to the cue model on cue "
          "data and keeps the cue.", lambda n: C6_RUNS, measures.c6),
    Claim("C7", "With lr 0.1, or from a cue model trained at p = 1, naive FT shows a barrier "
          "and becomes more cue-invariant.", lambda n: C7_RUNS, measures.c7),
    Claim("C8", "LP / last-layer retraining, LP-FT and DFR reduce but do not remove cue "
          "reliance.", lambda n: [train_run("cue", 0), STUDY], measures.c8),
    Claim("C9", "CBFT: rand_img near chance, clean ~ cue ~ rand_cue, clean within a few points "
          "of naive FT and far above training from scratch on the same clean examples.",
          lambda n: [train_run("cue", 0), STUDY], measures.c9, STUDY_FIGURES),
    Claim("C10", "CBFT's end point is not linearly connected to the cue model (on cue data).",
          lambda n: [train_run("cue", 0), STUDY], measures.c10, STUDY_FIGURES),
    Claim("C11", "Ablations: CBFT without the barrier loss keeps the cue; without the "
          "invariance loss a barrier forms but the model can anti-correlate with the cue.",
          lambda n: C11_RUNS, measures.c11),
    Claim("C12", "The study's pattern holds at cue proportions 0.6, 0.7, 0.8, 0.9 (Table 1's "
          "rows) and on Dominoes (glyphs10 above shapes10).", lambda n: C12_RUNS,
          measures.c12),
    Claim("C13", "One hidden layer: networks relying on different attributes are not linearly "
          "connected even after alignment; same attribute: connected after alignment; "
          "connected minimisers share activation patterns.", lambda n: [THEORY], measures.c13),
]
# Questions beyond the paper (experiments.claims_exploration), reported apart from the claims.
EXPLORATIONS = [
    Claim("E1", "Does the cue model's path to a CBFT model break in the same layers as its "
          "(weight-aligned) path to the no-cue model?",
          lambda n: exploration.runs(Run, _locked, train_run), exploration.e1,
          exploration.FIGURES[:2]),
    Claim("E2", "Do connected pairs of conv nets share activation patterns, as C13's theory "
          "says for one hidden layer?", lambda n: exploration.runs(Run, _locked, train_run),
          exploration.e2, exploration.FIGURES[2:]),
]
BY_ID = {c.id: c for c in CLAIMS + EXPLORATIONS}


def finished(directory: str, record_file: str, config) -> bool:
  """Whether `directory` holds a finished run of exactly `config` that read the finished runs
  its task reads now (their identities: recipe and final step); its record is then reused.
  A study records its cue model per run, and its config.train must match that model's recipe."""
  task = tasks.task_of(config)

  def identities():
    if not hasattr(task, "inputs"):
      return None
    # The inputs it reads depend on no batch size: resolved for one device, so that the
    # report never depends on the host's device count.
    return task.inputs(task.resolve(config, 1), False)[1]

  return runs.finished_record(directory, record_file, workdir_lib.config_to_dict(config),
                              identities) is not None


def run_claims(ids: list[str], root: str, pairs: int, overwrite: bool = False) -> None:
  """Runs every run the claims need, each once, in order: a finished run of the same config
  is reused, an unfinished one resumes, one of another config is refused (or replaced with
  `overwrite`) by the task's own claim of its directory."""
  done = set()
  for claim_id in ids:
    for run in BY_ID[claim_id].runs(pairs):
      if run.name in done:
        continue
      done.add(run.name)
      directory, config = os.path.join(root, run.name), run.make_config(root)
      if finished(directory, run.record_file, config):
        print(f"[{claim_id}] {run.name}: finished, reused", flush=True)
        continue
      start = time.perf_counter()
      print(f"[{claim_id}] {run.name}: running", flush=True)
      tasks.run(config, directory, overwrite=overwrite)
      print(f"[{claim_id}] {run.name}: {time.perf_counter() - start:.0f} s", flush=True)


def load_records(claim: Claim, root: str, pairs: int, cache: dict) -> dict | None:
  """{run name: record} of a claim's runs, or None if one is not a finished run of the
  claim's recipe (a record of another config is never reported). `cache` keeps each run's
  record (or None) across claims, which share runs."""
  for run in claim.runs(pairs):
    if run.name not in cache:
      directory = os.path.join(root, run.name)
      cache[run.name] = None
      if finished(directory, run.record_file, run.make_config(root)):
        with open(os.path.join(directory, run.record_file)) as f:
          cache[run.name] = json.load(f)
  records = {run.name: cache[run.name] for run in claim.runs(pairs)}
  return None if any(r is None for r in records.values()) else records


def _run_stem(name: str) -> str:
  """A run's name without its seed-pair index ('train_cue_2' -> 'train_cue')."""
  return re.sub(r"_\d+$", "", name)


# Every claims run's name, up to its seed-pair index: what a claims workdir holds.
RUN_STEMS = frozenset(_run_stem(run.name) for claim in CLAIMS + EXPLORATIONS
                      for run in claim.runs(1))


def workdir_problem(root: str, action: str) -> str | None:
  """Why `root` cannot be the claims workdir for `action` ('run' or 'report'); None: it can.

  A claims workdir holds only claims runs (directories named after them); `run` may also
  make a new or empty one, while `report` needs runs to read.
  """
  if not os.path.isdir(root):
    if os.path.exists(root):
      return f"--workdir {root} is a file, not a claims workdir"
    return None if action == "run" else (
        f"--workdir {root} does not exist: no claims runs to report (a typo? `python -m "
        "experiments.claims --command=run` makes them)")
  config = os.path.join(root, workdir_lib.CONFIG_FILE)
  if os.path.exists(config):
    try:
      with open(config) as f:
        task = repr(json.load(f).get("task"))
    except (OSError, ValueError, AttributeError):
      task = "unreadable"
    return (f"--workdir {root} holds a mechconn run (task {task}, {config}), not claims runs: "
            "the claims' runs would be nested inside it; use another --workdir")
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  foreign = [e for e in entries if _run_stem(e) not in RUN_STEMS]
  if foreign:
    return (f"--workdir {root} is not a claims workdir: it holds {foreign[:5]}, not claims "
            "runs; use a new or empty --workdir, or the claims one")
  if not entries and action == "report":
    return (f"--workdir {root} is empty: no claims runs to report (`python -m "
            "experiments.claims --command=run` makes them)")
  return None


# The command line: flags of their own (not absl's global ones), so that this module can be
# imported beside experiments.main, and main() called with a command line (as the tests do).
_FLAGS = flags.FlagValues()
_COMMAND = flags.DEFINE_enum(
    "command", None, ["run", "report"], "run: make the runs of --claims (a finished run is "
    "reused, an unfinished one resumes), then write the report; report: write the report of "
    "every claim from the finished runs.", flag_values=_FLAGS)
_CLAIMS = flags.DEFINE_list("claims", ["all"], "Claim ids (C1,C13,...) or all.",
                            flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/claims", "The claims' runs, one directory "
                               "each.", flag_values=_FLAGS)
_PAIRS = flags.DEFINE_integer("pairs", 3, "Seed pairs of end points C1..C5 use.", lower_bound=1,
                              flag_values=_FLAGS)
_OUT = flags.DEFINE_string("out", "docs/claims.md", "The report.", flag_values=_FLAGS)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "run: replace runs of another config (as experiments.main "
    "--overwrite); both: replace an --out with results the new report lacks, or that is not "
    "a claims report.", flag_values=_FLAGS)
_HELP_FLAGS = ("help", "helpshort", "helpfull", "h", "?")


def usage() -> str:
  """What --help prints: the docstring, every claim, the flags."""
  claims = [textwrap.fill(f"{c.id:<4} {c.statement}", 96, initial_indent="  ",
                          subsequent_indent=" " * 7) for c in CLAIMS + EXPLORATIONS]
  return "\n".join([__doc__, "Claims (--claims):", *claims, "", "Flags:",
                    _FLAGS.get_help(include_special_flags=False)])


def _refuse(message: str, status: int = 2) -> None:
  """Exits with `message` as one line on stderr."""
  print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
  sys.exit(status)


def _parse(argv: list[str]) -> list[str]:
  """The claim ids `argv` (flags, without the program name) asks for; one-line errors."""
  _FLAGS.unparse_flags()  # a second call in one process starts from the defaults
  try:
    rest = _FLAGS(["experiments.claims", *argv])[1:]
  except flags.Error as e:  # a bad value, an unknown flag
    _refuse(str(e))
  if rest:
    _refuse(f"unexpected arguments {rest}: the command and the claims are flags, e.g. "
            "--command=run --claims=C13")
  if _COMMAND.value is None:
    _refuse("--command is required: run (the claims' runs, then the report) or report (from "
            "the finished runs); --help lists the claims")
  ids = list(BY_ID) if _CLAIMS.value in (["all"], []) else _CLAIMS.value
  unknown = sorted(set(ids) - set(BY_ID))
  if unknown:
    _refuse(f"unknown claims {unknown}; valid: {list(BY_ID)} or all")
  return ids


def main(argv: list[str]) -> None:
  """Runs the command line `argv` (flags, without the program name)."""
  if any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in argv):
    print(usage())
    return
  ids = _parse(argv)
  problem = workdir_problem(_WORKDIR.value, _COMMAND.value)
  if problem:
    _refuse(f"{problem}. Nothing was run or written.")
  if _COMMAND.value == "run":
    try:
      run_claims(ids, _WORKDIR.value, _PAIRS.value, _OVERWRITE.value)
    except FileExistsError as e:  # a run's directory is another config's: the task's refusal
      _refuse(str(e), status=1)
  write_report(_WORKDIR.value, _PAIRS.value, _OUT.value, _OVERWRITE.value, _refuse)


def write_report(root: str, pairs: int, out: str, overwrite: bool, refuse: Callable) -> None:
  """Writes the report of the runs in `root` to `out` (with the figures beside it), unless it
  would replace a report with results it lacks, or a file that is not a claims report, without
  `overwrite`: then `refuse(message)` (which exits) and nothing is written."""
  from experiments import claims_report  # noqa: PLC0415 (only the report needs it)
  cache, figures = {}, []  # figures: copied only once the report is written

  def claim_figures(claim):
    found = claims_report.figure_files(claim, root)
    figures.extend(found)
    return list(dict.fromkeys(target for _, target in found))

  load = lambda c: load_records(c, root, pairs, cache)  # noqa: E731
  text = (claims_report.render(CLAIMS, load, pairs, figures=claim_figures)
          + claims_report.render_explorations(EXPLORATIONS, load, pairs, figures=claim_figures))
  if os.path.exists(out) and not overwrite:
    with open(out) as f:
      problem = claims_report.replacement_problem(f.read(), text)
    if problem:
      refuse(f"--out {out} was not replaced: {problem}. Pass --overwrite to replace it.")
      return
  out_dir = os.path.dirname(out) or "."
  os.makedirs(out_dir, exist_ok=True)
  claims_report.copy_figures(figures, out_dir)
  with open(out, "w") as f:
    f.write(text)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1:])
