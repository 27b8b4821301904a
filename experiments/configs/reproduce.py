r"""The paper's fine-tuning study (Table 1 and Figure 5) as one command.

Trains the cue model (box cue on 80% of each class), fine-tunes it on a small
clean set with naive FT, last-layer retraining (lp), LP-FT, DFR and CBFT for
three seeds, and reports the four-view table and the linear-path barrier from
the cue model to each fine-tuned model on cue data. CPU preset, embedded data:

  python -m experiments.main --config=experiments/configs/reproduce.py:cpu \
      --workdir=workdir/reproduce

Writes workdir/reproduce/report.md (the table, figures views.png and
paths.png), reproduce.json (every number) and the runs under runs/. Expected
on the 2-core CPU: see the README (wall time and table).

Paper presets `{cifar10,cifar100}_box{60,70,80,90}_{vgg13,resnet18}` and
`cifar10_dominoes{...}_{...}`: the train presets' cue model and the official
fine-tuning defaults (SGD lr 0.01 cosine, momentum 0.9, weight decay 1e-4,
batch 256, 20 epochs, 2,500 clean and 47,500 cue examples; CBFT margin 1,
lambda 1, one warm-up epoch). `,quicktest` shrinks any preset to seconds.
Embedded paper scale, `reproduce.py:shapes10_paper_{vgg13,resnet18}`: the same paper
recipe (full-width model, 100-epoch cue model at 80%, the official fine-tuning
defaults) on the embedded shapes10 (50,000 images of CIFAR's shape, no download), to
measure the whole study's accelerator time where CIFAR is not reachable; its dry run
(`--config.dry_run=True`) prints the estimate. A single method: `finetune.py`.
"""

import ml_collections

from experiments.configs import common
from experiments.configs import train as train_config

MODIFIERS = train_config.MODIFIERS  # modifiers and what each does


def presets() -> dict[str, str]:
  """Every preset and what it runs, in one line; the first is the default (None)."""
  lines = {"cpu": "the study on embedded shapes10 with the CPU recipes: the cpu_cue model, "
                  "5 methods x 3 seeds, views and paths (the README has its time)"}
  for name in train_config.EMBEDDED_PAPER_PRESETS:
    lines[name] = (f"the paper-scale study on embedded shapes10 (train.py:{name}'s cue model, "
                   "the official fine-tuning defaults): accelerator time without CIFAR")
  lines.update({name: f"the study on train.py:{name}'s cue model "
                      f"({train_config.describe_paper(name)}), the official fine-tuning defaults"
                for name in train_config.paper_presets()})
  return lines


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """The locked config of `preset[,modifier...]` (None: 'cpu')."""
  name, modifiers = common.parse_preset(preset, "cpu", MODIFIERS)
  if name != "cpu" and name not in (train_config.paper_presets()
                                    + list(train_config.EMBEDDED_PAPER_PRESETS)):
    raise ValueError(f"Unknown preset {name!r}; valid presets: cpu, train.py's paper "
                     "presets ({cifar10,cifar100}_box{percent}_{vgg13,resnet18}, ...) and "
                     f"{list(train_config.EMBEDDED_PAPER_PRESETS)}.")
  paper = name != "cpu"
  config = ml_collections.ConfigDict()
  config.task = "reproduce"  # runs mechconn.tasks.reproduce
  config.seed = 0  # draws the clean and cue sets
  config.seeds = (0, 1, 2)  # fine-tuning seeds
  # sequential, vmap (a loop method's seeds in one vmapped step) or auto (the backend's
  # default, mechconn.tasks.reproduce.DEFAULT_SEED_MODE).
  config.seed_mode = "auto"
  config.train = train_config.unlocked_config(name if paper else "cpu_cue")  # the cue model
  config.dry_run = False  # time one cue-model, naive and CBFT step; estimate; no data, no files
  config.cue_model_workdir = ""  # a finished train run to use; '': train it in workdir/cue_model
  config.finetune = common.finetune_section(paper)
  config.eval_batch_size = 512 if paper else 128  # views and paths (128: faster on CPU)
  # The linear path from the cue model to each fine-tuned model; BatchNorm from cue data.
  config.path = common.path_section(num_t=11, bn_examples=1024)
  if not paper:  # the 15-minute CPU budget: 2,000 test images per view, CPU-sized batches
    config.train.data.num_test = 2000
    config.train.eval_batch_size = 128
  if "quicktest" in modifiers:
    train_config.apply_quicktest(config.train)
    common.shrink_finetune(config.finetune)
    config.eval_batch_size = 80
    config.path.num_t, config.path.bn_examples = 3, 160
    config.seeds = (0, 1)
  config.lock()
  return config
