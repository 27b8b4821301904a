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

from experiments.configs import common
from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import train as train_config


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu')."""
  name, modifiers = common.parse_preset(preset, "cpu", train_config.MODIFIERS)
  if name != "cpu" and name not in train_config.paper_presets():
    raise ValueError(f"Unknown preset {name!r}; valid presets: cpu and train.py's paper "
                     "presets ({cifar10,cifar100}_box{percent}_{vgg13,resnet18}, ...).")
  paper = name != "cpu"
  recipe = train_config.unlocked_config(name if paper else "cpu_cue")  # the cue model's
  config = ml_collections.ConfigDict()
  config.task = "eval_path"
  config.seed = recipe.seed  # weight matching's order of permutation groups
  config.data = recipe.data
  config.data.num_test = -1 if paper else 2000  # test examples per view; -1: the whole split
  # The end points' model is theirs; this copy only builds a dry run before they exist.
  config.endpoint_model = recipe.model
  config.start_workdir, config.end_workdir = fit_curve_config.endpoint_workdirs(name)
  prefix = f"workdir/curve_{name}" if paper else "workdir/curve"
  config.curve_workdirs = (f"{prefix}_clean", f"{prefix}_cue")  # fitted curves to evaluate
  config.align = "weight"  # none, weight (Git Re-Basin weight matching) or activation
  # Activation matching correlates post_relu (every site's ReLU: the units' outputs, as the
  # official code; for ReLU networks, as all built-in models) or module_outputs (before it).
  config.activation_sites = "post_relu"
  config.path = common.path_section(num_t=11, bn_examples=1024)
  config.path.bn_data = "clean"  # BatchNorm statistics at each t from clean (or 'train') data
  config.eval_batch_size = 512 if paper else 128  # global, for the views and BatchNorm
  config.barrier_metric = "error"  # the barrier that decides Definition 5: error or loss
  config.barrier_tolerance = 0.05  # a barrier above this breaks the path on that view
  # Build the paths, time one t, estimate the run; read no data, write nothing
  # (mechconn.tasks.eval_path.dry_run).
  config.dry_run = False
  if "quicktest" in modifiers:
    config.data.num_test = 100
    config.path.num_t, config.path.bn_examples = 3, 64
    config.eval_batch_size = 32
  config.lock()
  return config
