"""Exploration beyond the paper's claims: where the barriers form, and activation patterns.

Not the paper's statements and not verdicts: questions the diagnostics
(`mechconn.diagnostics`, eval_path's `diagnostics` section) answer on the
claims' end points of seed pair 0, reported apart from the 13 claims:

  E1: does the cue model's path to a CBFT model break in the same layers as its
      (weight-aligned) path to the no-cue model? Layer-wise barriers on the cue
      and clean views, groups = the permutation spec's (each conv with its
      BatchNorm, and the head).
  E2: do connected pairs of conv nets share activation patterns, as C13's theory
      says for one hidden layer? The end points' agreement of ReLU activation
      patterns (at each BatchNorm before its ReLU) for the pair naive FT keeps
      connected (C6) against the broken pairs (no-cue, CBFT).

Each finding is read off the records by the rule stated in its 'criteria',
fixed before the runs were read.
"""

import os

from experiments.configs import eval_path as eval_path_config
from experiments.configs import finetune as finetune_config

BN_SITES = ("BatchNorm_0", "BatchNorm_1", "BatchNorm_2")  # SmallCNN: each feeds a ReLU


def finetune_run(run_cls, locked, method: str):
  """`method` fine-tuned from the claims' cue model of pair 0 (finetune.py's recipe, seed 0)."""
  def make(root):
    return locked(finetune_config.get_config(method),
                  {"cue_model_workdir": os.path.join(root, "train_cue_0")})
  return run_cls(f"finetune_{method}_0", make, "result.json")


def explore_run(run_cls, locked, end: str, align: str):
  """eval_path (cpu) from the cue model of pair 0 to `end`, layer-wise and features on."""
  def make(root):
    return locked(eval_path_config.get_config("cpu"), {
        "start_workdir": os.path.join(root, "train_cue_0"),
        "end_workdir": os.path.join(root, end), "curve_workdirs": (), "align": align,
        "diagnostics.run": ("layerwise", "features")})
  name = end.removesuffix("_0").removeprefix("train_").removeprefix("finetune_")
  return run_cls(f"explore_{name}_0", make, "eval_path.json")


def runs(run_cls, locked, train_run) -> list:
  """Every run of the explorations: the pair-0 end points, two fine-tunings, three paths."""
  return [train_run("cue", 0), train_run("nocue", 0),
          finetune_run(run_cls, locked, "cbft"), finetune_run(run_cls, locked, "naive"),
          explore_run(run_cls, locked, "train_nocue_0", "weight"),
          explore_run(run_cls, locked, "finetune_cbft_0", "none"),
          explore_run(run_cls, locked, "finetune_naive_0", "none")]


def _path(records, run: str, path: str) -> dict:
  return records[run]["diagnostics"][path]


def _carriers(layerwise: dict, view: str) -> dict[str, float]:
  """{group: the loss barrier when every group but it moves (it stays at the cue model)}."""
  return {g: b["all_but@a"]["loss"] for g, b in layerwise["barriers"][view].items()}


NEEDED = 0.1  # a group is needed when freezing it leaves at most this share of the barrier


def e1(records, pairs):
  """Layer-wise barriers: which groups the cue->CBFT and cue->no-cue paths need."""
  del pairs
  paths = {"cue -> no-cue (weight-aligned)": ("explore_nocue_0", "linear (aligned)"),
           "cue -> CBFT": ("explore_cbft_0", "linear")}
  cells, needed = [], {}
  for view in ("cue", "clean"):
    for name, (run, path) in paths.items():
      layerwise = _path(records, run, path)["layerwise"]
      full = records[run]["paths"][path]["barriers"][view]["loss"]
      without = _carriers(layerwise, view)  # the barrier when all but g move
      only = {g: b["only@a"]["loss"] for g, b in layerwise["barriers"][view].items()}
      needed[(name, view)] = sorted(g for g, v in without.items() if v <= NEEDED * full)
      cells.append(f"{name}, {view} view (path loss barrier {full:.3f}): all but g move "
                   + ", ".join(f"{g} {v:.3f}" for g, v in without.items())
                   + "; only g moves " + ", ".join(f"{g} {v:.3f}" for g, v in only.items()))
  names = list(paths)
  same = [needed[(names[0], view)] == needed[(names[1], view)] for view in ("cue", "clean")]
  finding = ("same layers" if all(same) else
             "different layers" if not any(same) else "same layers on one view")
  summary = "; ".join(f"{view} view, {n}: needs {', '.join(needed[(n, view)]) or 'no group'}"
                      for view in ("cue", "clean") for n in names)
  return {"measured": f"{summary}. Per group (loss barriers): " + " | ".join(cells),
          "verdict": finding,
          "criteria": "a path needs group g when freezing g at the cue model (every other "
                      f"group moving) leaves at most {NEEDED:g} of the path's loss barrier; "
                      "'same layers' when both paths need the same groups on both views. "
                      "Changed after the first reading: the first rule took the one group "
                      "whose freezing left the lowest barrier, which breaks ties (P_0 and P_1 "
                      "both left 0.000) by name; it gave the same finding",
          "setup": _setup(records)}


def e2(records, pairs):
  """End points' activation-pattern agreement: connected pair vs broken pairs."""
  del pairs
  pairs_ = {"cue -> naive FT": ("explore_naive_0", "linear"),
            "cue -> no-cue (weight-aligned)": ("explore_nocue_0", "linear (aligned)"),
            "cue -> CBFT": ("explore_cbft_0", "linear")}
  view = "cue"
  agree, error = {}, {}
  for name, (run, path) in pairs_.items():
    summary = _path(records, run, path)["features"]["summary"][view]
    agree[name] = {s: summary[s]["endpoint_agreement"] for s in BN_SITES}
    error[name] = records[run]["paths"][path]["barriers"][view]["error"]
  connected = [n for n in pairs_ if error[n] <= 0.05]
  broken = [n for n in pairs_ if error[n] > 0.05]
  higher = all(min(agree[c][s] for c in connected) > max(agree[b][s] for b in broken)
               for s in BN_SITES) if connected and broken else None
  verdict = ("not decided (no connected or no broken pair)" if higher is None
             else "yes" if higher else "no")
  return {"measured": "; ".join(
              f"{n} (cue-view error barrier {error[n]:.3f}): agreement "
              + ", ".join(f"{s} {agree[n][s]:.3f}" for s in BN_SITES) for n in pairs_),
          "verdict": verdict,
          "criteria": "on the cue view, a pair is connected when its error barrier is <= 0.05 "
                      "(Definition 5's tolerance); 'yes' when every connected pair's end points "
                      "agree more, at every BatchNorm (before its ReLU), than every broken "
                      "pair's",
          "setup": _setup(records)}


def _setup(records) -> str:
  record = records["explore_nocue_0"]
  d = record["config"]["diagnostics"]
  return (f"seed pair 0's SmallCNN(32) cue and no-cue models, and the cue model fine-tuned "
          f"by finetune.py's cbft and naive (seed 0); {d['num_t']} t, the first "
          f"{d['num_examples']} test examples of each view, BatchNorm recomputed at every t "
          f"from {record['batchnorm']['num_examples']} clean training images")


FIGURES = (("explore_nocue_0", "eval_path_layerwise.png"),
           ("explore_cbft_0", "eval_path_layerwise.png"),
           ("explore_naive_0", "eval_path_features.png"))
