"""mechconn.config_checks: every refusal names the field and what was expected."""

import pytest

from mechconn import config_checks as checks


@pytest.mark.parametrize("value, kwargs, message", [
    (float("nan"), {}, r"config.x=nan must be a finite number"),
    (float("-inf"), {"low": 0.0}, r"config.x=-inf must be a finite number"),
    (True, {}, r"config.x=True must be a finite number"),  # a bool is not a number here
    ("0.1", {}, r"config.x='0.1' must be a finite number"),
    (-0.5, {"low": 0.0}, r"config.x=-0.5 must be >= 0"),
    (0.0, {"low": 0.0, "low_open": True}, r"config.x=0.0 must be > 0"),
    (1.0, {"low": 0.0, "high": 1.0, "high_open": True}, r"must be in \[0, 1\)"),
    (2.0, {"high": 1.0}, r"config.x=2.0 must be <= 1"),
])
def test_check_number_refuses_with_the_interval(value, kwargs, message):
  with pytest.raises(ValueError, match=message):
    checks.check_number(value, "x", **kwargs)


def test_check_number_accepts_the_bounds_it_includes():
  checks.check_number(0, "x", low=0.0, high=1.0)
  checks.check_number(1.0, "x", low=0.0, high=1.0)
  checks.check_number(3, "x", low=0.0, low_open=True)


def test_integer_and_seed_checks():
  with pytest.raises(ValueError, match=r"config.n=0 must be a positive integer"):
    checks.check_positive_int(0, "n")
  with pytest.raises(ValueError, match=r"config.n=2.0 must be a positive integer"):
    checks.check_positive_int(2.0, "n")
  with pytest.raises(ValueError, match=r"config.num_t=1 must be at least 2\."):
    checks.check_int(1, "num_t", minimum=2)
  with pytest.raises(ValueError, match=r"config.k=-1 must be a non-negative integer \(hint\)"):
    checks.check_int(-1, "k", hint=" (hint)")
  with pytest.raises(ValueError, match=r"config.seeds=\(\) must be a non-empty tuple"):
    checks.check_seeds((), "seeds")
  with pytest.raises(ValueError, match=r"config.seeds\[1\]=-2 must be a non-negative integer"):
    checks.check_seeds((0, -2), "seeds")
  with pytest.raises(ValueError, match=r"valid choices: \['a', 'b'\]"):
    checks.check_choice("c", ("b", "a"), "kind")
  checks.check_seeds((0, 1, 2), "seeds")
