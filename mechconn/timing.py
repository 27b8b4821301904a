"""Where a job's wall time goes: named phases, and compilation from JAX's own events.

  with timing.recording() as clock:          # around a whole job
    with timing.phase(timing.DATA):          # anywhere below, library code included
      ...
  clock.breakdown()   # {phase: seconds}, 'compilation' and 'other': they sum to the wall time

Phases nest; a second counts toward the innermost phase open at that moment
(exclusive times), and seconds outside every phase count as 'other'. JAX's
tracing, lowering and XLA compilation (`jax.monitoring`'s time spans of
jaxpr tracing, MLIR lowering and backend compilation, counted as their union so
a function traced inside another counts once) are moved from the phase they
ran in to 'compilation'. Outside `recording()`, a phase costs a list lookup and
records nothing. Several recordings may be open at once (a study and the
training run it launches); each sees every phase and compilation.

Dispatch is asynchronous: a phase's seconds are the host's, and device work
counts toward the phase in which the host waits for it. A phase that must own
its device work blocks on it before it ends (`loop.train_loop` blocks on the
state before it checkpoints or evaluates, so the steps' compute counts as
training).
"""

import collections
from collections.abc import Iterator
import contextlib
import functools
import os
import platform
import time

import jax

# The phases mechconn's library and tasks mark.
TRAINING = "training steps"  # optimiser steps, head fits (their batches' assembly is DATA)
COMPILATION = "compilation"  # tracing, lowering, XLA compilation (from jax.monitoring)
EVALUATION = "evaluation"  # models on eval sets and views, features for a head fit
PATH_EVALUATION = "path evaluation"  # barriers.evaluate_path: statistics and metrics over t
DATA = "data"  # datasets generated or loaded, sets drawn, batches assembled and placed
CHECKPOINTS = "checkpoints"  # saving, restoring and waiting for checkpoints
OUTPUTS = "outputs"  # records, reports, figures, metrics files
STARTUP = "startup"  # from the process's start to the recording's (imports, flags, config)
OTHER = "other"  # inside the recording, in no phase
# JAX's events whose time spans are compilation (jax/_src/dispatch.py); the union of the
# spans counts, as tracing one function also traces the jitted functions it calls.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per compilation
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            BACKEND_COMPILE_EVENT})

_CLOCKS: list["WallClock"] = []  # the open recordings, innermost last
_LAUNCHED: list[float] = []  # time.time() of the process's start, once `mark_launch` says


class WallClock:
  """A recording's seconds per phase; `breakdown()` reads it (see the module docstring)."""

  def __init__(self, startup: float | None = None):
    self.seconds = collections.defaultdict(float)
    self.compiled_functions = collections.defaultdict(lambda: [0, 0.0])  # name: [count, s]
    self.startup = startup
    self._open: list[str] = []
    self._start = self._mark = time.perf_counter()
    self._spans: list[tuple[float, float]] = []  # compile spans seen, disjoint, sorted

  def _flush(self) -> None:
    """Counts the seconds since the last mark toward the innermost open phase."""
    now = time.perf_counter()
    self.seconds[self._open[-1] if self._open else OTHER] += now - self._mark
    self._mark = now

  def enter(self, name: str) -> None:
    self._flush()
    self._open.append(name)

  def exit(self) -> None:
    self._flush()
    self._open.pop()

  def compiled(self, start: float, end: float, name: str = "", backend: bool = True) -> None:
    """A compile event's span (time.time()) of function `name` (`backend`: an XLA
    compilation, counted; else its tracing or lowering): its seconds not already counted
    move from the current phase to 'compilation'."""
    if backend:
      self.compiled_functions[name][0] += 1
    new = (end - start) - sum(max(0.0, min(end, e) - max(start, s)) for s, e in self._spans)
    if new <= 0.0:
      return
    self.compiled_functions[name][1] += new
    merged = [(s, e) for s, e in self._spans if e < start or s > end]
    overlapping = [(s, e) for s, e in self._spans if not (e < start or s > end)]
    merged.append((min([start] + [s for s, _ in overlapping]),
                   max([end] + [e for _, e in overlapping])))
    self._spans = sorted(merged)
    self.seconds[COMPILATION] += new
    self.seconds[self._open[-1] if self._open else OTHER] -= new

  @property
  def compilations(self) -> int:
    """XLA compilations seen (every function's count)."""
    return sum(count for count, _ in self.compiled_functions.values())

  def breakdown(self, top: int = 10) -> dict:
    """{'seconds': {phase: s}, 'fraction': {phase: share of the wall}, 'wall_seconds',
    'compilations', 'most_compile_time': the `top` functions by compile seconds, with their
    number of compilations}; with a known startup (`since_launch`), the wall time counts
    from the process's start."""
    self._flush()
    seconds = dict(self.seconds)
    if self.startup is not None:
      seconds[STARTUP] = self.startup
    wall = sum(seconds.values())
    return {"wall_seconds": round(wall, 2),
            "seconds": {k: round(v, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
            "fraction": {k: round(v / wall, 4) if wall else 0.0 for k, v in seconds.items()},
            "compilations": self.compilations,
            "most_compile_time": {name: {"count": count, "seconds": round(s, 3)}
                                  for name, (count, s) in sorted(
                                      self.compiled_functions.items(),
                                      key=lambda kv: -kv[1][1])[:top]}}


def _on_span(event: str, start: float, end: float, **kwargs) -> None:
  if event in COMPILE_EVENTS:
    for clock in _CLOCKS:
      clock.compiled(start, end, str(kwargs.get("fun_name", "")),
                     backend=event == BACKEND_COMPILE_EVENT)


def mark_launch() -> None:
  """Declares this process a job's launch (`experiments.main` does): recordings opened with
  `since_launch` count the seconds from the process's start as 'startup'."""
  age = process_age()
  if age is not None and not _LAUNCHED:
    _LAUNCHED.append(time.time() - age)


@contextlib.contextmanager
def recording(*, since_launch: bool = False) -> Iterator[WallClock]:
  """Records phases and compilation while inside; yields the `WallClock`.

  `since_launch`: when the process was marked as a launch (`mark_launch`), the
  seconds from its start to here (imports, flags, the config's checks, the
  workdir's claim) count as 'startup'; otherwise the wall time starts here.
  """
  startup = time.time() - _LAUNCHED[0] if since_launch and _LAUNCHED else None
  clock = WallClock(startup=startup)
  if not _CLOCKS:
    jax.monitoring.register_event_time_span_listener(_on_span)
  _CLOCKS.append(clock)
  try:
    yield clock
  finally:
    clock._flush()  # pylint: disable=protected-access
    _CLOCKS.remove(clock)
    if not _CLOCKS:
      jax.monitoring.unregister_event_time_span_listener(_on_span)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
  """Counts the seconds inside toward `name` in every open recording (innermost phase wins)."""
  clocks = list(_CLOCKS)
  for clock in clocks:
    clock.enter(name)
  try:
    yield
  finally:
    for clock in clocks:
      clock.exit()


def timed(name: str):
  """A decorator: every call of the function is a `phase(name)`."""
  def wrap(fn):
    @functools.wraps(fn)
    def timed_fn(*args, **kwargs):
      with phase(name):
        return fn(*args, **kwargs)
    return timed_fn
  return wrap


def process_age() -> float | None:
  """Seconds since this process started (Linux's /proc), or None where unknown."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: starttime
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return None


def format_breakdown(breakdown: dict, training: str = TRAINING) -> str:
  """Markdown: seconds and share of the wall time per phase (largest first), and the share
  of everything but `training`."""
  lines = ["| phase | seconds | share |", "|---|---|---|"]
  for name, seconds in breakdown["seconds"].items():
    lines.append(f"| {name} | {seconds:.1f} | {breakdown['fraction'][name]:.1%} |")
  rest = 1.0 - breakdown["fraction"].get(training, 0.0)
  lines.append(f"| **all but {training}** | "
               f"{breakdown['wall_seconds'] - breakdown['seconds'].get(training, 0.0):.1f} | "
               f"**{rest:.1%}** |")
  return "\n".join(lines)


def machine() -> dict:
  """What ran: the backend, its devices' kind and number, the host's CPU and core count."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "devices": jax.device_count(), "cpu": cpu, "cpu_cores": os.cpu_count()}
