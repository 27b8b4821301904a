"""stack_batches: padding, masks and errors."""

import numpy as np
import pytest

from mechconn.data.batching import stack_batches


def test_pads_last_batch_and_masks_it():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10)
  out = stack_batches(x, y, 4)
  assert out["image"].shape == (3, 4, 1) and out["label"].shape == (3, 4)
  np.testing.assert_array_equal(out["mask"].ravel(), [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(out["label"].ravel()[:10], y)
  assert out["mask"].sum() == 10


def test_drop_remainder_keeps_full_batches_only():
  out = stack_batches(np.zeros((10, 2)), np.zeros(10), 4, drop_remainder=True)
  assert out["image"].shape == (2, 4, 2) and out["mask"].all()


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
    stack_batches(np.zeros((3, 1)), np.zeros(2), 2)
  with pytest.raises(ValueError, match="no full batch"):
    stack_batches(np.zeros((3, 1)), np.zeros(3), 4, drop_remainder=True)
