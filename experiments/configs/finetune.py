r"""Fine-tune a finished cue model with one method and seed (`reproduce.py` runs them all).

  python -m experiments.main --config=experiments/configs/finetune.py:cbft \
      --workdir=workdir/ft_cbft --config.cue_model_workdir=workdir/cpu_cue

Presets are the method names (naive, lp, lp_ft, dfr, cbft), with the CPU
fine-tuning recipe of reproduce.py:cpu; `,paper` switches to the official
defaults (lr 0.01 cosine, batch 256, 20 epochs, 47,500 cue examples) and
`,quicktest` shrinks the run to seconds. Writes result.json (the four views)
and, for loop methods, checkpoints and metrics.jsonl. Expected on the 2-core
CPU for SmallCNN(32): naive about 30 s, cbft about 70 s, lp and dfr a few seconds.
"""

import ml_collections

from experiments.configs import common

MODIFIERS = {  # modifiers and what each does
    "paper": "the official fine-tuning defaults (lr 0.01 cosine, batch 256, 20 epochs, "
             "47,500 cue examples)",
    "quicktest": common.QUICKTEST}


def presets() -> dict[str, str]:
  """Every preset (a method) and what it runs, in one line; the first is the default (None)."""
  return {"naive": "naive fine-tuning: every layer on the clean set (CPU recipe: lr 0.001)",
          "lp": "last-layer retraining: a fresh head on the frozen backbone's cached features",
          "lp_ft": "LP-FT: lp, then naive fine-tuning from its result",
          "dfr": "deep feature reweighting: an L2 logistic-regression head on standardised "
                 "features of a class-balanced clean set",
          "cbft": "connectivity-based fine-tuning: a barrier step on cue data, then a clean "
                  "step with the invariance loss",
          "scratch": "the baseline: the naive loop from a fresh init on the same clean set"}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `method[,paper][,quicktest]` (None: 'naive')."""
  method, modifiers = common.parse_preset(preset, "naive", MODIFIERS)
  if method not in common.ALL_METHODS:
    raise ValueError(f"Unknown preset {method!r}; valid presets: {list(common.ALL_METHODS)}.")
  config = ml_collections.ConfigDict()
  config.task = "finetune"  # runs mechconn.tasks.finetune
  config.method = method  # naive, lp, lp_ft, dfr, cbft, or the scratch baseline
  config.seed = 0  # the clean/cue draw and the fine-tuning run
  config.cue_model_workdir = "workdir/cpu_cue"  # a finished train run
  config.finetune = common.finetune_section(paper="paper" in modifiers)
  config.finetune.methods = (method,)
  config.eval_batch_size = 512  # global, for the four views
  # The views' data is the cue model's, but for the fraction of each class's test examples
  # the cue views treat.
  config.data = ml_collections.ConfigDict()
  config.data.test_cue_proportion = 1.0  # of each class's test examples the cue views treat
  # Load the cue model, build the method's loop, time one step, estimate; no data, no files.
  config.dry_run = False
  if "quicktest" in modifiers:
    common.shrink_finetune(config.finetune)
    config.eval_batch_size = 80
  config.lock()
  return config
