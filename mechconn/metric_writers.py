"""Where metrics go: JSON lines and TensorBoard event files, the same scalars at the same steps.

- `LoopMetrics`: what `loop.train_loop` writes into its workdir. Every line of
  `metrics.jsonl` also goes to a TensorBoard event file beside it: each numeric
  field but 'step' a scalar tagged with its JSON key ('train/loss',
  'eval/clean/accuracy', 'learning_rate', 'epoch', ...) at the line's step.
- `write_curves`: curves over t of a path (eval_path's loss and accuracy per path
  and view) as TensorBoard scalars at the integer steps `t_step(t)` = round(1000 t).

Event files are written whenever tensorboardX is installed (`pip install tensorboardX`,
or the 'tensorboard' extra), by process 0 only; without it they are left out, said once
at INFO. View them with `pip install tensorboard; tensorboard --logdir <workdir>`.

Where: in the workdir itself (as the flax examples write theirs), not a subdirectory.
TensorBoard takes each directory holding event files as one run, so a study's nested
workdirs show under their own names (reproduce's 'cue_model', 'runs/cbft_seed0'), and
the files are plain files of the task's `workdir.Layout` (`EVENT_FILES`): `--overwrite`
deletes them with the rest of the run, and only the ones mechconn names (the
'.mechconn' ending), never another program's event files.

Resume: each launch of a loop writes a new file, named by the step it starts from
('events.out.tfevents.from_step_<12 digits>.mechconn', whatever the time, host or
number of processes), and first deletes the files of launches that started at or
after that step (all they hold is past it): the names left sort in launch order, the
order TensorBoard reads them in. The new file opens with the events tensorboardX's
`SummaryWriter(purge_step=start + 1)` writes, a SessionLog START at that step:
TensorBoard then drops what earlier files hold past the start, as `metrics.jsonl` is
truncated there, and shows for each tag the value last written at each step
(TensorBoard's fast loader drops them when the resumed run writes the tag again at
those steps, which it does: a resumed run logs the same steps).

Why not `SummaryWriter` itself: it hands events to a background thread that writes and
flushes on its own schedule (every 120 s by default; its `flush()` does not wait for
queued events), so a killed run could lose records of steps up to its checkpoint that
metrics.jsonl kept and a resumed run never writes again. Here every record is framed
(TFRecord: length, its masked CRC-32C, payload, its masked CRC-32C; tensorboardX's
CRC and protos) and flushed as it is written, like the JSON lines.
"""

from collections.abc import Mapping, Sequence
import contextlib
import functools
import numbers
import os
import re
import struct
import time
from typing import Any

from absl import logging

from mechconn import workdir as workdir_lib

EVENT_FILE_SUFFIX = ".mechconn"
# The event files mechconn writes (a `workdir.Layout` pattern): TensorBoard reads any file
# whose name holds 'tfevents'; the ending marks the ones that are mechconn's.
EVENT_FILES = "events.out.tfevents.*" + EVENT_FILE_SUFFIX
_LOOP_EVENT_FILE = re.compile(r"events\.out\.tfevents\.from_step_(\d+)" +
                              re.escape(EVENT_FILE_SUFFIX))
T_STEPS = 1000  # a path's t as a TensorBoard step: round(T_STEPS * t)


@functools.cache
def tensorboardx() -> Any:
  """The tensorboardX module, or None when it is not installed (said once, at INFO)."""
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.info("tensorboardX is not installed: no TensorBoard event files are written "
                 "(metrics.jsonl holds the same numbers; pip install tensorboardX adds them).")
    return None
  return tensorboardX


def loop_event_file(start_step: int) -> str:
  """The event file of a loop launched from `start_step` (0: a fresh run)."""
  return f"events.out.tfevents.from_step_{start_step:012d}{EVENT_FILE_SUFFIX}"


def remove_superseded(workdir: str, start_step: int) -> list[str]:
  """Deletes the loop event files of launches from `start_step` or later; returns them.

  They hold only steps past `start_step`, which a launch from there logs again.
  """
  removed = []
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    match = _LOOP_EVENT_FILE.fullmatch(name)
    if match and int(match.group(1)) >= start_step:
      os.remove(os.path.join(workdir, name))
      removed.append(name)
  return removed


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of a metrics line: {its key: value} of each number but 'step'."""
  return {k: float(v) for k, v in record.items()
          if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def t_step(t: float) -> int:
  """A path's t as a TensorBoard step: round(1000 t) (t = 0.25 -> 250).

  Distinct for grids of up to 1,001 points in [0, 1] (`np.linspace(0, 1, 1001)`);
  on a finer grid neighbouring t share a step and TensorBoard shows the later one.
  """
  return round(T_STEPS * float(t))


class EventFile:
  """Scalars appended to a new TensorBoard event file at `path`; each event is flushed.

  Needs tensorboardX (`tensorboardx()` is not None). `purge_step`: the first event
  after the file version is a SessionLog START at that step, which makes
  TensorBoard drop what earlier files of the directory hold at steps >= it.
  """

  def __init__(self, path: str, *, purge_step: int | None = None):
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import summary_pb2  # pylint: disable=import-outside-toplevel
    from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
    self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
    self.path = path
    self._file = open(path, "xb")  # a new file: never written over
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if purge_step is not None:
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._write(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))

  def _write(self, event: Any) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", self._crc(header)) + data +
                     struct.pack("<I", self._crc(data)))
    self._file.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event at `step` holding every scalar {tag: value} (as float32, TensorBoard's)."""
    if not scalars:
      return
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in scalars.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self) -> None:
    if not self._file.closed:
      os.fsync(self._file.fileno())
      self._file.close()


class LoopMetrics:
  """`metrics.jsonl` and the TensorBoard event file of one `train_loop` launch in `workdir`.

  Opening it is the metrics' part of a resume: the JSON lines past `start_step`
  are dropped, the event files of launches from `start_step` or later deleted, and
  the new event file purges steps > `start_step` (see the module docstring). Only
  an `enabled` writer (process 0's) touches any file.
  """

  def __init__(self, workdir: str, start_step: int, *, enabled: bool = True):
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    if enabled:
      workdir_lib.truncate_metrics(path, start_step)
      remove_superseded(workdir, start_step)
    self.jsonl = workdir_lib.MetricsWriter(path, enabled=enabled)
    self.events = None
    if enabled and tensorboardx() is not None:
      self.events = EventFile(os.path.join(workdir, loop_event_file(start_step)),
                              purge_step=start_step + 1)

  def write(self, record: dict) -> None:
    """One metrics line (a dict with its 'step'), to both files."""
    self.jsonl.write(record)
    if self.events is not None:
      self.events.write(record["step"], scalars_of(record))

  def close(self) -> None:
    try:
      self.jsonl.close()
    finally:
      if self.events is not None:
        self.events.close()


def write_curves(ts: Sequence[float], curves: Mapping[str, Sequence[float]],
                 path: str) -> None:
  """Writes curves over t as TensorBoard scalars to an event file at `path`, atomically.

  Args:
    ts: [K] the grid.
    curves: {tag: [K] values at each t}, e.g. {'linear/clean/loss': [...]}.
    path: the event file (its name must hold 'tfevents' for TensorBoard to read
      it); an existing one is replaced. Nothing is written without tensorboardX.

  Each t is one event at step `t_step(t)` = round(1000 t) holding every tag's value.
  """
  if tensorboardx() is None:
    return
  tmp = os.path.join(os.path.dirname(path), f".curves-{os.getpid()}.tmp")  # not read as events
  with contextlib.suppress(FileNotFoundError):
    os.remove(tmp)  # left by a write that failed
  events = EventFile(tmp)
  try:
    for k, t in enumerate(ts):
      events.write(t_step(t), {tag: values[k] for tag, values in curves.items()})
  finally:
    events.close()
  os.replace(tmp, path)
