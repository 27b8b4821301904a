"""mechconn.metric_writers: TensorBoard event files hold what metrics.jsonl holds.

The event files are read back here without tensorboardX's writer: the TFRecord
framing (8-byte little-endian length, masked CRC-32C of it, payload, masked
CRC-32C of it) is parsed and checked by this file's own CRC, and each payload
decoded as an `Event` proto. `tensorboard_view` applies what TensorBoard shows:
files in name order; a SessionLog START at step s drops every value at steps >= s
read before it; the value last written at a (tag, step) is the one shown.
"""

import functools
import glob
import logging
import os
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import metric_writers
from mechconn import step as step_lib
from mechconn import workdir as workdir_lib
from mechconn.data import batching
from mechconn.data.prototypes import make_prototype_images
from mechconn.models import get_model


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    crc = n
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15, plus 0xa282ead8."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str) -> list[event_pb2.Event]:
  """Every event of a TFRecord file, each record's two checksums checked."""
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
        "<I", data[pos + 8:pos + 12])
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), path
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  assert pos == len(data)  # no torn record
  return events


def event_files(directory) -> list[str]:
  """The event files TensorBoard reads in `directory` (names holding 'tfevents'), in order."""
  return sorted(p for p in glob.glob(os.path.join(str(directory), "*tfevents*"))
                if os.path.isfile(p))


def tensorboard_view(directory) -> dict[tuple[str, int], float]:
  """{(tag, step): value} as TensorBoard shows the directory's scalars (module docstring)."""
  shown = {}
  for path in event_files(directory):
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {k: v for k, v in shown.items() if k[1] < event.step}
      for value in event.summary.value:
        shown[(value.tag, event.step)] = value.simple_value
  return shown


def jsonl_scalars(directory) -> dict[tuple[str, int], float]:
  """{(key, step): float32 value} of every number in every line of metrics.jsonl."""
  scalars = {}
  for line in workdir_lib.read_metrics(os.path.join(str(directory), workdir_lib.METRICS_FILE)):
    for key, value in line.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        assert (key, line["step"]) not in scalars
        scalars[(key, line["step"])] = float(np.float32(value))
  return scalars


def _tiny_loop(workdir, num_steps, *, stop_at=None, kill=False):
  """train_loop for an MLP, logging every 3 steps, evaluating every 5, checkpoints every 10;
  `stop_at`: the step before which it raises (or, with `kill`, SIGKILLs its process)."""
  (x, y) = make_prototype_images(1, 128, image_size=8, noise=0.8)
  model = get_model("mlp", 10, hidden=(8,))
  tx = step_lib.sgd_cosine(0.05, 40)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  init_fn = functools.partial(step_lib.create_train_state, model, tx, jax.random.key(0),
                              jnp.zeros((1, 8, 8, 3)))
  train_step = functools.partial(step_lib.train_step, root_key=jax.random.key(1),
                                 loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx)

  def step_fn(state, batch):
    if stop_at is not None and int(state.step) == stop_at:
      if kill:
        os.kill(os.getpid(), signal.SIGKILL)
      raise KeyboardInterrupt(f"stopped at step {stop_at}")
    return train_step(state, batch)

  def batch_fn(step):
    idx = batching.batch_indices_at_step(128, 32, seed=0, step=step)
    return mesh_lib.shard_batch({"image": x[idx], "label": y[idx]}, mesh)

  options = loop.LoopOptions(num_steps=num_steps, log_every=3, checkpoint_every=10,
                             eval_every=5, steps_per_epoch=4, progress=False)
  return loop.train_loop(init_fn, step_fn, batch_fn, str(workdir), options, mesh=mesh,
                         learning_rate_fn=lambda s: 0.05 / (1 + s), examples_per_step=32,
                         eval_fn=lambda s: {"eval/step_seen": int(s.step), "eval/half": 0.5})


def test_event_files_hold_the_scalars_of_metrics_jsonl(tmp_path):
  _tiny_loop(tmp_path, 11)
  files = event_files(tmp_path)
  assert files == [str(tmp_path / "events.out.tfevents.from_step_000000000000.mechconn")]
  assert glob.glob(str(tmp_path / metric_writers.EVENT_FILES)) == files
  expected = jsonl_scalars(tmp_path)
  assert tensorboard_view(tmp_path) == expected
  tags = {tag for tag, _ in expected}
  assert {"train/loss", "train/accuracy", "learning_rate", "epoch", "examples_per_s",
          "eval/step_seen", "eval/half"} <= tags
  assert sorted({s for _, s in expected}) == [3, 5, 6, 9, 10, 11]
  # One event per metrics line: the events past the file's two header events.
  events = read_events(files[0])
  assert events[0].file_version == "brain.Event:2"
  assert (events[1].step, events[1].session_log.status) == (1, event_pb2.SessionLog.START)
  lines = workdir_lib.read_metrics(str(tmp_path / workdir_lib.METRICS_FILE))
  assert [e.step for e in events[2:]] == [r["step"] for r in lines]


def test_a_run_stopped_by_an_error_and_resumed_reads_as_its_metrics_jsonl(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    _tiny_loop(tmp_path, 20, stop_at=13)  # checkpoint 10; logged 12: past it
  first = event_files(tmp_path)
  assert len(first) == 1  # closed on the error: every record is complete
  assert ("train/loss", 12) in {(v.tag, e.step) for e in read_events(first[0])
                                for v in e.summary.value}
  _tiny_loop(tmp_path, 20)
  files = event_files(tmp_path)
  assert files == [first[0], str(tmp_path / metric_writers.loop_event_file(10))]
  events = read_events(files[1])
  assert (events[1].step, events[1].session_log.status) == (11, event_pb2.SessionLog.START)
  assert tensorboard_view(tmp_path) == jsonl_scalars(tmp_path)
  assert max(s for _, s in jsonl_scalars(tmp_path)) == 20


def test_a_resume_purges_from_tensorboard_what_it_truncates_from_metrics_jsonl(tmp_path):
  writer = metric_writers.LoopMetrics(str(tmp_path), 0)
  for step in range(1, 7):
    writer.write({"step": step, "train/loss": float(step)})
  writer.write({"step": 5, "eval/x": 5.0})
  writer.close()
  writer = metric_writers.LoopMetrics(str(tmp_path), 3)  # resumed from step 3
  writer.write({"step": 4, "train/loss": 40.0})
  writer.close()
  assert sorted(jsonl_scalars(tmp_path)) == [("train/loss", s) for s in (1, 2, 3, 4)]
  assert tensorboard_view(tmp_path) == jsonl_scalars(tmp_path)
  assert tensorboard_view(tmp_path)[("train/loss", 4)] == 40.0
  metric_writers.LoopMetrics(str(tmp_path), 3).close()  # from step 3 again: replaces its file
  assert [os.path.basename(f) for f in event_files(tmp_path)] == [
      metric_writers.loop_event_file(0), metric_writers.loop_event_file(3)]
  assert tensorboard_view(tmp_path) == jsonl_scalars(tmp_path)
  metric_writers.LoopMetrics(str(tmp_path), 2).close()  # from an earlier step (2): what
  assert [os.path.basename(f) for f in event_files(tmp_path)] == [  # started later is gone
      metric_writers.loop_event_file(0), metric_writers.loop_event_file(2)]
  assert sorted(jsonl_scalars(tmp_path)) == [("train/loss", s) for s in (1, 2)]
  assert tensorboard_view(tmp_path) == jsonl_scalars(tmp_path)


@pytest.mark.slow  # a subprocess trains until it SIGKILLs itself
def test_a_sigkilled_run_resumed_reads_as_its_metrics_jsonl(tmp_path):
  script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_metric_writers as t; "
            "t._tiny_loop(sys.argv[2], 20, stop_at=17, kill=True)")
  proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__),
                         str(tmp_path)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  killed = tensorboard_view(tmp_path)
  assert ("train/loss", 15) in killed  # written before the kill (checkpoint 10, maybe 15)
  _tiny_loop(tmp_path, 20)
  assert tensorboard_view(tmp_path) == jsonl_scalars(tmp_path)
  assert sorted({s for _, s in jsonl_scalars(tmp_path)}) == [3, 5, 6, 9, 10, 12, 15, 18, 20]


def test_overwrite_deletes_the_event_files_and_nothing_else(tmp_path):
  with workdir_lib.claim(str(tmp_path), {"task": "t", "lr": 1}, loop.LAYOUT):
    _tiny_loop(tmp_path, 4)
  foreign = ["events.out.tfevents.1700000000.otherhost", "notes.txt"]  # another program's
  for name in foreign:
    (tmp_path / name).write_text("kept")
  ours = glob.glob(str(tmp_path / metric_writers.EVENT_FILES))
  assert len(ours) == 1
  with workdir_lib.claim(str(tmp_path), {"task": "t", "lr": 2}, loop.LAYOUT, overwrite=True):
    pass
  assert sorted(os.listdir(tmp_path)) == sorted(foreign + [workdir_lib.CONFIG_FILE,
                                                       workdir_lib.LOCK_FILE])


def test_only_an_enabled_writer_writes(tmp_path):
  writer = metric_writers.LoopMetrics(str(tmp_path), 0, enabled=False)
  writer.write({"step": 1, "train/loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


@pytest.fixture
def no_tensorboardx(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  metric_writers.tensorboardx.cache_clear()
  yield
  metric_writers.tensorboardx.cache_clear()


def test_without_tensorboardx_only_metrics_jsonl_and_one_info_line(no_tensorboardx, tmp_path,
                                                                  caplog):
  with caplog.at_level(logging.INFO):
    for start in (0, 1):
      writer = metric_writers.LoopMetrics(str(tmp_path), start)
      writer.write({"step": start + 1, "train/loss": 1.0})
      writer.close()
    metric_writers.write_curves([0.0, 1.0], {"a": [1.0, 2.0]}, str(tmp_path / "x.tfevents"))
  assert sorted(os.listdir(tmp_path)) == [workdir_lib.METRICS_FILE]
  said = [r for r in caplog.records if "tensorboardX" in r.getMessage()]
  assert len(said) == 1 and said[0].levelno == logging.INFO


def test_write_curves_writes_steps_of_round_1000_t_and_replaces_the_file(tmp_path):
  path = str(tmp_path / "events.out.tfevents.curves.mechconn")
  ts = np.linspace(0.0, 1.0, 7)
  metric_writers.write_curves(ts, {"linear/clean/loss": [9.0] * 7}, path)
  curves = {"linear/clean/loss": np.linspace(1.0, 2.0, 7).tolist(), "x/y": [0.25] * 7}
  metric_writers.write_curves(ts, curves, path)
  assert event_files(tmp_path) == [path]  # replaced, no temporary left
  steps = [0, 167, 333, 500, 667, 833, 1000]
  assert [metric_writers.t_step(t) for t in ts] == steps
  assert tensorboard_view(tmp_path) == {
      (tag, s): float(np.float32(v)) for tag, values in curves.items()
      for s, v in zip(steps, values)}


def test_scalars_of_a_line_are_its_numbers_but_the_step():
  line = {"step": 3, "train/loss": 0.5, "epoch": 1, "ok": True, "name": "x", "n": np.float32(2)}
  assert metric_writers.scalars_of(line) == {"train/loss": 0.5, "epoch": 1.0, "n": 2.0}
  assert len({metric_writers.t_step(t) for t in np.linspace(0, 1, 1001)}) == 1001
