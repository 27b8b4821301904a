"""mechconn.tasks.quickstart: its checks and its table (the run itself: test_quickstart.py)."""

import pytest

from experiments.configs import quickstart as quickstart_configs
from mechconn.tasks import quickstart


def test_format_path_table_lists_every_t_and_the_barriers():
  record = {"ts": [0.0, 0.5, 1.0], "loss": [0.1, 0.9, 0.2], "accuracy": [0.9, 0.5, 0.95],
            "summary": {"loss": 0.75, "loss_t": 0.5, "error": 0.425, "error_t": 0.5}}
  lines = quickstart.format_path_table(record).splitlines()
  assert lines[2].split() == ["0.500", "0.9000", "0.5000"]
  assert lines[-2] == "loss barrier  0.7500 (at t = 0.500)"
  assert lines[-1] == "error barrier 0.4250"


@pytest.mark.parametrize("key, value, message", [
    ("path.num_t", 1, r"config.path.num_t=1 must be at least 2"),
    ("path.bn_examples", 100, r"path.bn_examples=100 makes no full batch of eval_batch_size=128"),
    ("path.bn_examples", 4096, r"path.bn_examples=4096 exceeds config.data.num_train=1024"),
    ("optimizer.momentum", 1.0, r"config.optimizer.momentum=1.0 must be in \[0, 1\)"),
    ("batch_size", 2048, r"batch_size=2048 exceeds the 1024 training examples"),
])
def test_quickstart_config_errors_name_the_field(key, value, message):
  config = quickstart_configs.get_config("quicktest")
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=message):
    quickstart.resolve(config, num_devices=1)
