"""The two-attribute synthetic data of the one-hidden-layer theory (claim C13)."""

import numpy as np
import pytest

from mechconn.data import two_attributes


@pytest.mark.parametrize("predictive", [("linear",), ("complex",), ("linear", "complex")])
def test_predictive_attributes_carry_the_label_and_the_others_nothing(predictive):
  x, y = two_attributes.make(20_000, predictive, seed=0)
  assert x.shape == (20_000, 10) and x.dtype == np.float32 and set(np.unique(y)) == {0, 1}
  from_linear = (x[:, 0] > 0).astype(int)
  from_complex = two_attributes.complex_label(x[:, 1])
  for name, decoded in (("linear", from_linear), ("complex", from_complex)):
    agreement = np.mean(decoded == y)
    if name in predictive:
      assert agreement == 1.0, name
    else:
      assert abs(agreement - 0.5) < 0.02, name  # independent of the label
  assert np.abs(x[:, 0]).min() >= 0.1 and np.abs(x[:, 1]).max() <= 1  # margins, support
  assert abs(np.std(x[:, 2:]) - 0.5) < 0.01  # the noise dimensions


def test_bands_alternate_labels_and_data_are_seeded():
  values = np.array([-0.99, -0.6, -0.4, 0.1, 0.6])  # bands 0, 0, 1, 2, 3 of 4
  np.testing.assert_array_equal(two_attributes.complex_label(values), [0, 0, 1, 0, 1])
  a = two_attributes.make(100, ("linear",), seed=3)
  b = two_attributes.make(100, ("linear",), seed=3)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], two_attributes.make(100, ("linear",), seed=4)[0])
  with pytest.raises(ValueError, match=r"predictive=\('shape',\) must name attributes"):
    two_attributes.make(10, ("shape",), seed=0)
  with pytest.raises(ValueError, match="bands=3 must be an even number"):
    two_attributes.make(10, ("linear",), seed=0, bands=3)
