r"""Evaluate LMC, permutation-aligned LMC and fitted curves between the cue and no-cue models.

Needs the two train runs and the fitted curves first (docs/tasks.md, "Connectivity").
CPU preset, on the embedded shapes10 data:

  python -m experiments.main --config=experiments/configs/eval_path.py:cpu \
      --workdir=workdir/eval_path

Writes eval_path.json (per path and view: loss and accuracy at every t, barrier
heights and where they sit, the Definition 5 verdict, and the provenance of
every number), eval_path.png (loss and accuracy along t: a column of panels per
path, one line per view) and the curves as TensorBoard scalars. Expected on the
2-core CPU: about 1 minute; the numbers are in docs/tasks.md.

`cpu,diagnose` also runs every diagnostic on every path and the adaptive maximum
(layer-wise barriers, feature connectivity, curvature, calibration;
docs/diagnostics.md; `--config.diagnostics.run` picks some).

Paper presets `{dataset}_box{percent}_{model}` (as fit_curve.py's, without the
suffix) evaluate the paper's runs in workdir/ with their two fitted curves
(workdir/curve_{preset}_clean and workdir/curve_{preset}_cue).

Language models, `recall_lm`: the linear path and the weight-aligned linear path
(Git Re-Basin weight matching on the permutation spec derived from the model:
residual stream, heads, head dimensions, MLP units) between train.py's
`recall_lm` and `recall_lm_seed1` runs, next-token loss and accuracy over the
masked targets of their 4,096 held-out sequences (the eval set 'test'), 11 t.
Train both first (train.py's docstring), then

  python -m experiments.main --config=experiments/configs/eval_path.py:recall_lm \
      --workdir=workdir/eval_path_lm
  python -m experiments.main --config=experiments/configs/eval_path.py:recall_lm,repair \
      --workdir=workdir/eval_path_lm_repair   # REPAIR at every t (1,024 training sequences)

Expected on the 2-core CPU (jax 0.10), measured: 11 s and 12 s (the paths
themselves 5 s and 7 s); every barrier at t = 0.5, every path broken:

  renormalize   path               error barrier   loss barrier
  none          linear                 0.744           2.60
  none          linear (aligned)       0.719           2.74
  repair        linear                 0.700           2.60
  repair        linear (aligned)       0.699           2.82

(the end points: loss 0.0007, accuracy 1.000; at t = 0.5 accuracy is 0.26-0.30;
chance on an answer is 1/8).
`recall_lm,quicktest` evaluates train.py's quicktest runs on 3 t.
"""

import ml_collections

from experiments.configs import common
from experiments.configs import fit_curve as fit_curve_config
from experiments.configs import train as train_config


MODIFIERS = {**train_config.MODIFIERS,  # modifiers and what each does
             "repair": "recall_lm only: REPAIR at every t (each unit rescaled to the "
                       "interpolated end points' statistics)",
             "diagnose": "image presets: every diagnostic on every path (layer-wise barriers, "
                         "feature connectivity, curvature, calibration) and the adaptive "
                         "maximum (docs/diagnostics.md)"}
LM_PRESET = "recall_lm"


def presets() -> dict[str, str]:
  """Every preset and what it evaluates, in one line; the first is the default (None)."""
  lines = {"cpu": "LMC, weight-aligned LMC and the two fitted curves between train.py's cpu_cue "
                  "and cpu_nocue runs on the four views (about 1 min on CPU)",
           LM_PRESET: "the linear and the weight-aligned linear path between train.py's "
                      "recall_lm and recall_lm_seed1 runs (about 11 s on CPU)"}
  for name in train_config.paper_presets():
    start, end = fit_curve_config.endpoint_workdirs(name)
    same = " (one run at both ends: refused as identical)" if start == end else ""
    lines[name] = (f"{train_config.describe_paper(name)}: the paths from {start} to "
                   f"{end}{same} and their fitted curves, on every test example")
  return lines


def lm_config(modifiers: list[str]) -> ml_collections.ConfigDict:
  """The paths between train.py's two language models (`recall_lm`, `recall_lm_seed1`)."""
  recipe = train_config.unlocked_config(train_config.LM_PRESETS[0])
  train_config.apply_modifiers(recipe, [m for m in modifiers if m != "repair"])
  config = ml_collections.ConfigDict()
  config.task = "eval_path"  # runs mechconn.tasks.eval_path
  config.seed = recipe.seed  # weight matching's order of permutation groups
  config.data = recipe.data  # the end points' held-out sequences are the eval set 'test'
  # The end points' model is theirs; this copy only builds a dry run before they exist.
  config.endpoint_model = recipe.model
  # The train runs at t = 0 and t = 1 (the two language models).
  config.start_workdir, config.end_workdir = (f"workdir/{p}" for p in train_config.LM_PRESETS)
  # The same run (or identical weights) at both ends is refused unless this is True.
  config.allow_identical_endpoints = False
  config.curve_workdirs = ()  # fitted curves: image models only
  config.align = "weight"  # none or weight (Git Re-Basin weight matching on a derived spec)
  config.path = ml_collections.ConfigDict()
  config.path.num_t = 11  # points on the path, np.linspace(0, 1, num_t)
  # Training sequences for REPAIR's statistics at each t (whole batches of eval_batch_size).
  config.path.bn_examples = 1024
  # none, or repair (each unit's activation rescaled at every t to the interpolated end
  # points' statistics; mechconn.repair)
  config.path.renormalize = "repair" if "repair" in modifiers else "none"
  config.eval_batch_size = recipe.eval_batch_size  # global, for the eval set and statistics
  if "quicktest" in modifiers:  # the data is already the quicktest train runs'
    config.path.num_t, config.path.bn_examples = 3, 64
    config.eval_batch_size = 32
  config.barrier_metric = "error"  # the barrier that decides the verdict: error or loss
  config.barrier_tolerance = 0.05  # a barrier above this breaks the path
  config.dry_run = False  # build, time one t, estimate; read no data, write nothing
  config.lock()
  return config


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu')."""
  name, modifiers = common.parse_preset(preset, "cpu", MODIFIERS)
  if "diagnose" in modifiers and name == LM_PRESET:
    raise ValueError(f"The 'diagnose' modifier is for the image presets (the diagnostics of "
                     f"{LM_PRESET!r}: mechconn.diagnostics, from Python).")
  if name == LM_PRESET:
    return lm_config(modifiers)
  if "repair" in modifiers:
    raise ValueError(f"The 'repair' modifier is for {LM_PRESET!r} (BatchNorm models recompute "
                     "their statistics instead).")
  if name != "cpu" and name not in train_config.paper_presets():
    raise ValueError(f"Unknown preset {name!r}; valid presets: cpu, {LM_PRESET} and train.py's "
                     "paper presets ({cifar10,cifar100}_box{percent}_{vgg13,resnet18}, ...).")
  paper = name != "cpu"
  recipe = train_config.unlocked_config(name if paper else "cpu_cue")  # the cue model's
  config = ml_collections.ConfigDict()
  config.task = "eval_path"  # runs mechconn.tasks.eval_path
  config.seed = recipe.seed  # weight matching's order of permutation groups
  config.data = recipe.data
  config.data.num_test = -1 if paper else 2000  # test examples per view; -1: the whole split
  # The end points' model is theirs; this copy only builds a dry run before they exist.
  config.endpoint_model = recipe.model
  # The train runs at t = 0 (the cue model) and t = 1 (the no-cue model).
  config.start_workdir, config.end_workdir = fit_curve_config.endpoint_workdirs(name)
  # The same run (or identical weights) at both ends is refused unless this is True.
  config.allow_identical_endpoints = False
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
  config.diagnostics = common.diagnostics_section()
  if "diagnose" in modifiers:
    config.diagnostics.run = ("layerwise", "features", "curvature", "calibration")
    config.diagnostics.adaptive = True
  # Build the paths, time one t, estimate the run; read no data, write nothing
  # (mechconn.tasks.eval_path.dry_run).
  config.dry_run = False
  if "quicktest" in modifiers:
    config.data.num_test = 100
    config.path.num_t, config.path.bn_examples = 3, 64
    config.eval_batch_size = 32
    config.diagnostics.num_t, config.diagnostics.num_examples = 3, 64
    config.diagnostics.curvature_examples, config.diagnostics.num_matvecs = 32, 4
    config.diagnostics.num_probes, config.diagnostics.calibration_examples = 2, 64
  config.lock()
  return config
