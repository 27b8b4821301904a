"""Range checks for config fields, each error naming the field: `config.<key>=<value> must ...`.

Tasks validate every numeric field of their config with these before they
read data or claim a workdir, so a bad value fails in a second with the
field's name, not minutes later from deep inside the library (or never: a
negative learning rate trains by gradient ascent, a NaN passes `lr <= 0`).
"""

import math
import numbers
from collections.abc import Collection


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(value, valid: Collection, key: str) -> None:
  """Raises ValueError naming config.<key> and the valid choices unless value is one."""
  if value not in valid:
    raise ValueError(f"config.{key}={value!r} is not valid; valid choices: {sorted(valid)}.")


def check_int(value, key: str, *, minimum: int = 0, hint: str = "") -> None:
  """Raises ValueError naming config.<key> unless value is an integer >= minimum.

  `hint` follows the requirement in the message, e.g. ' (or -1: the whole split)'.
  """
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"at least {minimum}" if isinstance(value, numbers.Integral)
        and not isinstance(value, bool) else f"an integer of at least {minimum}")
    raise ValueError(f"config.{key}={value!r} must be {what}{hint}.")


def check_positive_int(value, key: str, hint: str = "") -> None:
  """Raises ValueError naming config.<key> unless value is a positive integer."""
  check_int(value, key, minimum=1, hint=hint)


def check_number(value, key: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
  """Raises ValueError naming config.<key> unless value is a finite number in the interval.

  Args:
    value: the field's value (bools, strings, NaN and infinities are refused).
    key: the dotted field name, e.g. 'optimizer.momentum'.
    low, high: bounds (None: unbounded on that side).
    low_open, high_open: exclude the bound itself.
  """
  if not _is_real(value) or not math.isfinite(value):
    raise ValueError(f"config.{key}={value!r} must be a finite number.")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    if low is not None and high is not None:
      interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
      interval = f"{'>' if low_open else '>='} {low:g}"
    else:
      interval = f"{'<' if high_open else '<='} {high:g}"
    raise ValueError(f"config.{key}={value!r} must be {interval}.")


def check_seeds(seeds, key: str) -> None:
  """Raises ValueError unless seeds is a non-empty sequence of distinct non-negative integers."""
  if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Collection) or not seeds:
    raise ValueError(f"config.{key}={seeds!r} must be a non-empty tuple of seeds.")
  for i, seed in enumerate(seeds):
    check_int(seed, f"{key}[{i}]")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"config.{key}={tuple(seeds)!r} repeats a seed.")
