r"""Quickstart: two SmallCNNs from different seeds, and the linear path between them.

Runs on the embedded prototype-image task (no download):

  python -m experiments.main --config=experiments/configs/quickstart.py \
      --workdir=/tmp/mechconn_quickstart

Expected on a 2-core CPU (jax 0.10): about 15 seconds in all; both models reach
about 0.99 train accuracy; the path is evaluated at 11 values of t with
BatchNorm statistics recomputed at each. Presets (`quickstart.py:PRESET`):
  default    the run above;
  quicktest  a few seconds, for smoke tests (tiny data, 1 epoch, 5 values of t).
"""

import ml_collections

from experiments.configs import common

PRESETS = ("default", "quicktest")
# Modifiers (after the preset and a comma) and what each does; 'default,quicktest' is 'quicktest'.
MODIFIERS = {"quicktest": common.QUICKTEST}


def presets() -> dict[str, str]:
  """Every preset and what it runs, in one line; the first is the default (None)."""
  return {"default": "two SmallCNN(16)s from seeds 0 and 1 on the embedded prototype images, "
                     "4 epochs, the linear path at 11 t (about 15 s on a 2-core CPU)",
          "quicktest": "the same in a few seconds: 1,024 images, 1 epoch, width 4, 5 t"}



def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked quickstart config for a preset (None = 'default')."""
  name, modifiers = common.parse_preset(preset, "default", MODIFIERS)
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; valid presets: {list(PRESETS)}.")
  config = ml_collections.ConfigDict()
  config.task = "quickstart"  # runs mechconn.tasks.quickstart
  config.seed = 0  # model i is trained with seed + i

  config.data = ml_collections.ConfigDict()
  config.data.num_classes = 10  # one prototype per class
  config.data.image_size = 16  # images are image_size x image_size x 3
  config.data.noise = 0.8  # pixel noise std (prototypes lie in [-1, 1])
  config.data.num_train = 8192  # training examples
  config.data.num_test = 2048  # eval examples for the path
  config.data.train_seed = 1  # draws the training split
  config.data.test_seed = 2  # draws the test split (different from train)

  config.model = common.model_section("small_cnn", width=16)
  config.optimizer = common.optimizer_section(0.05)  # cosine decay to 0 over all steps

  config.batch_size = 128  # training batch size
  config.num_epochs = 4  # training epochs per model
  config.eval_batch_size = 128  # eval and BatchNorm batch size (<= 128 on CPU: docs/performance.md)
  # The linear path between the two models; BatchNorm from the first 1,024 training examples.
  config.path = common.path_section(num_t=11, bn_examples=1024)

  if name == "quicktest" or "quicktest" in modifiers:
    config.data.num_train = 1024
    config.data.num_test = 300
    config.num_epochs = 1
    config.path.num_t, config.path.bn_examples = 5, 256
    config.model.kwargs.width = 4
  config.lock()
  return config
