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


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked quickstart config for a preset (None = 'default')."""
  config = ml_collections.ConfigDict()
  config.task = "linear_barrier"  # driver in mechconn.drivers
  config.seed = 0  # model i is trained with seed + i

  config.data = ml_collections.ConfigDict()
  config.data.num_classes = 10  # one prototype per class
  config.data.image_size = 16  # images are image_size x image_size x 3
  config.data.noise = 0.8  # pixel noise std (prototypes lie in [-1, 1])
  config.data.num_train = 8192  # training examples
  config.data.num_test = 2048  # eval examples for the path
  config.data.train_seed = 1  # draws the training split
  config.data.test_seed = 2  # draws the test split (different from train)

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"  # one of mechconn.models.MODELS
  config.model.kwargs = ml_collections.ConfigDict({"width": 16})  # model attributes

  config.batch_size = 128  # training batch size
  config.num_epochs = 4  # training epochs per model
  config.learning_rate = 0.05  # peak lr, cosine decay to 0
  config.momentum = 0.9  # SGD momentum
  config.weight_decay = 5e-4  # decoupled L2 added to the gradient

  config.num_t = 11  # points on the path, np.linspace(0, 1, num_t)
  config.eval_batch_size = 128  # eval and BatchNorm batch size (<= 128 on CPU: see README)
  config.bn_batches = 8  # full training batches for BatchNorm recomputation (1,024 examples)

  preset = preset or "default"
  if preset == "quicktest":
    config.data.num_train = 1024
    config.data.num_test = 300
    config.num_epochs = 1
    config.num_t = 5
    config.bn_batches = 2
    config.model.kwargs.width = 4
  elif preset != "default":
    raise ValueError(f"Unknown preset {preset!r}; valid presets: ['default', 'quicktest'].")
  config.lock()
  return config
