r"""Evaluate LMC, permutation-aligned LMC and fitted curves between the cue and no-cue models.

Needs the two train runs and the fitted curves first (README, "Connectivity").
CPU preset, on the embedded shapes10 data:

  python -m experiments.main --config=experiments/configs/eval_path.py:cpu \
      --workdir=workdir/eval_path

Writes eval_path.json (per path and view: loss and accuracy at every t, barrier
heights and where they sit, the Definition 5 verdict, and the provenance of
every number) and eval_path.png (accuracy along t: one panel per path, one line
per view). Expected on the 2-core CPU: about 1 minute; see the README for the
numbers.

Paper presets `{dataset}_box{percent}_{model}` (as fit_curve.py's, without the
suffix) evaluate the paper's runs in workdir/ with their two fitted curves
(workdir/curve_{preset}_clean and workdir/curve_{preset}_cue).
"""

import ml_collections

from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import train as train_config


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu')."""
  name, *modifiers = (preset or "cpu").split(",")
  config = train_config.unlocked_config("cpu_cue" if name == "cpu" else name)
  config.task = "eval_path"
  # The end points' model is theirs; this copy only builds a dry run before they exist.
  config.endpoint_model = ml_collections.ConfigDict(config.model.to_dict())
  for key in ("model", "optimizer", "num_epochs", "batch_size", "log_every_steps",
              "eval_every_steps", "checkpoint_every_steps", "max_to_keep", "progress"):
    # (dry_run stays: build, time one t, estimate; see mechconn.dry_run)
    del config[key]
  config.start_workdir, config.end_workdir = fit_curve_config.endpoint_workdirs(name)
  prefix = "workdir/curve" if name == "cpu" else f"workdir/curve_{name}"
  config.curve_workdirs = (f"{prefix}_clean", f"{prefix}_cue")  # fitted curves to evaluate
  config.align = "weight"  # none, weight (Git Re-Basin weight matching) or activation
  config.num_t = 11  # points on each path, np.linspace(0, 1, num_t)
  config.data.num_test = 2000 if name == "cpu" else -1  # test examples per view
  config.bn = ml_collections.ConfigDict()
  config.bn.data = "clean"  # BatchNorm recomputed at each t from clean (or 'train') data
  config.bn.num_examples = 1024  # training examples for the BatchNorm statistics
  config.eval_batch_size = 128 if name == "cpu" else 512
  config.barrier_metric = "error"  # the barrier that decides Definition 5: error or loss
  config.barrier_tolerance = 0.05  # a barrier above this breaks the path on that view
  for modifier in modifiers:
    if modifier == "quicktest":
      config.data.num_test = 100
      config.bn.num_examples = 64
      config.eval_batch_size = 32
      config.num_t = 3
    else:
      raise ValueError(f"Unknown preset modifier {modifier!r}; valid modifiers: "
                       f"{list(train_config.MODIFIERS)}.")
  config.lock()
  return config
