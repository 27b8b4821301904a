r"""Fit a quadratic Bezier curve between the cue model (t = 0) and the no-cue model (t = 1).

Needs the two train runs first (docs/tasks.md, "Training endpoint models"). CPU presets,
SmallCNN(32) end points on the embedded shapes10 data:

  python -m experiments.main --config=experiments/configs/fit_curve.py:cpu_clean \
      --workdir=workdir/curve_clean     # fitted on clean data (no cue)
  python -m experiments.main --config=experiments/configs/fit_curve.py:cpu_cue \
      --workdir=workdir/curve_cue       # fitted on cue data (every image has the box)

Expected on the 2-core CPU (jax 0.10): about 3 minutes each (3 epochs of
50,000 images; one forward and backward at one point of the curve per step,
as a training step). Then `eval_path.py:cpu` evaluates them.

Paper presets `{dataset}_box{percent}_{model}_{clean|cue}` (dataset cifar10 or
cifar100, percent as the train presets, model vgg13 or resnet18) use the
paper code's recipe: 15 epochs, SGD lr 0.1 x0.1 every 10 epochs, momentum
0.9, weight decay 1e-4 (the training recipe's), batch 128, between
workdir/{dataset}_box{percent}_{model} and workdir/{dataset}_box0_{model}.
Append `,quicktest` to shrink any preset to seconds.
"""

import ml_collections

from experiments.configs import common
from experiments.configs import train as train_config

MODIFIERS = train_config.MODIFIERS  # modifiers and what each does
FIT_DATA = {"clean": 0.0, "cue": 1.0}  # cue proportion of the data the curve is fitted on
# The loop fields taken from the cue model's recipe (a curve fit evaluates nothing).
LOOP_FIELDS = ("num_epochs", "batch_size", "per_device_batch_size", "log_every_steps",
               "checkpoint_every_steps", "max_to_keep", "progress")


def presets() -> dict[str, str]:
  """Every preset and what it fits, in one line; the first is the default (None)."""
  lines = {"cpu_clean": "the quadratic Bezier curve between train.py's cpu_cue (t = 0) and "
                        "cpu_nocue (t = 1) runs, fitted on clean data (about 3 min on CPU)",
           "cpu_cue": "as cpu_clean, fitted on cue data (every image has the box)"}
  for base in train_config.paper_presets():
    start, end = endpoint_workdirs(base)
    same = " (one run at both ends: refused as identical)" if start == end else ""
    for fit_on in FIT_DATA:
      lines[f"{base}_{fit_on}"] = (f"{train_config.describe_paper(base)}: the curve from "
                                   f"{start} to {end}{same}, fitted on {fit_on} data, the "
                                   "paper code's recipe")
  return lines


def endpoint_workdirs(base: str) -> tuple[str, str]:
  """(cue model, no-cue model) train workdirs of a base preset ('cpu' or a paper one)."""
  if base == "cpu":
    return "workdir/cpu_cue", "workdir/cpu_nocue"
  dataset, cue, _, model = train_config.parse_paper_preset(base)
  return f"workdir/{base}", f"workdir/{dataset}_{cue}0_{model}"


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu_clean')."""
  name, modifiers = common.parse_preset(preset, "cpu_clean", MODIFIERS)
  base, _, fit_on = name.rpartition("_")
  if fit_on not in FIT_DATA or not (base == "cpu" or base in train_config.paper_presets()):
    raise ValueError(f"Unknown preset {name!r}; valid presets: cpu_clean, cpu_cue and "
                     "{train.py's paper preset}_{clean,cue}, e.g. cifar10_box80_vgg13_clean.")
  # The cue model's training recipe: its data, model, optimiser and loop (the curve's).
  recipe = train_config.unlocked_config("cpu_cue" if base == "cpu" else base)
  config = ml_collections.ConfigDict()
  config.task = "fit_curve"  # runs mechconn.tasks.fit_curve
  config.seed = recipe.seed  # the free points' init and the step's t
  config.data = recipe.data
  # The end points' model is theirs; this copy only builds a dry run before they exist.
  config.endpoint_model = recipe.model
  config.optimizer = recipe.optimizer
  common.add_loop_fields(config, **{k: recipe[k] for k in LOOP_FIELDS})
  # Build, time one curve step, estimate the fit; read no data, write nothing.
  config.dry_run = False
  # t = 0: the cue model's train run; t = 1: the no-cue model's.
  config.start_workdir, config.end_workdir = endpoint_workdirs(base)
  # The same run (or identical weights) at both ends is refused unless this is True.
  config.allow_identical_endpoints = False
  # The cue proportion of the data the curve is fitted on (clean: 0, cue: 1).
  config.data.cue_proportion = FIT_DATA[fit_on]
  config.curve = ml_collections.ConfigDict()
  config.curve.kind = "bezier"  # bezier or polychain
  config.curve.num_free = 1  # free control points: 1 = quadratic Bezier
  config.curve.init = "fresh"  # fresh (a new init, as the paper's code) or linear (midpoint)
  if base != "cpu":  # the paper code's curve recipe
    config.num_epochs = 15
    config.batch_size = 128
    config.optimizer.decay_every_epochs = 10
  train_config.apply_modifiers(config, modifiers)
  config.lock()
  return config
