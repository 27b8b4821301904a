"""mechconn.drivers helpers."""

from mechconn import drivers


def test_format_path_table_lists_every_t_and_the_barriers():
  record = {"ts": [0.0, 0.5, 1.0], "loss": [0.1, 0.9, 0.2], "accuracy": [0.9, 0.5, 0.95],
            "loss_barrier": 0.75, "loss_barrier_t": 0.5, "error_barrier": 0.425}
  lines = drivers.format_path_table(record).splitlines()
  assert lines[2].split() == ["0.500", "0.9000", "0.5000"]
  assert lines[-2] == "loss barrier  0.7500 (at t = 0.500)"
  assert lines[-1] == "error barrier 0.4250"
