"""Where the wall time goes: phases, compilation from JAX's events, the loop's accounting."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import loop
from mechconn import mesh as mesh_lib
from mechconn import step as step_lib
from mechconn import timing
from mechconn.models import MLP


def _sum(breakdown):
  return sum(breakdown["seconds"].values())


def test_phases_nest_and_every_second_counts_once():
  with timing.recording() as clock:
    with timing.phase("outer"):
      time.sleep(0.03)
      with timing.phase("inner"):
        time.sleep(0.3)
      time.sleep(0.02)
    time.sleep(0.01)
  b = clock.breakdown()
  assert b["seconds"]["inner"] >= 0.3
  # Exclusive: the outer phase holds its own 0.05 s, not the inner's 0.3 s as well.
  assert 0.05 <= b["seconds"]["outer"] < 0.3
  assert b["seconds"][timing.OTHER] >= 0.01
  assert _sum(b) == pytest.approx(b["wall_seconds"], abs=0.05)
  assert sum(b["fraction"].values()) == pytest.approx(1.0, abs=1e-3)
  assert timing.STARTUP not in b["seconds"]  # not a launch: the wall starts at the recording


def test_a_phase_outside_any_recording_records_nothing_and_leaves_no_listener():
  listeners = jax._src.monitoring._event_time_span_listeners  # pylint: disable=protected-access
  with timing.phase("anything"):
    pass
  assert not timing._CLOCKS  # pylint: disable=protected-access
  with timing.recording():
    assert timing._on_span in listeners  # pylint: disable=protected-access
  assert timing._on_span not in listeners  # pylint: disable=protected-access


def test_a_phase_left_by_an_exception_is_closed():
  with timing.recording() as clock:
    with pytest.raises(ValueError):
      with timing.phase("failing"):
        raise ValueError("x")
    with timing.phase("after"):
      time.sleep(0.01)
  assert clock._open == []  # pylint: disable=protected-access
  assert clock.breakdown()["seconds"]["after"] >= 0.01


def test_compilation_moves_out_of_the_phase_it_ran_in():
  def f(x):
    for _ in range(30):  # a program that takes a measurable time to compile
      x = jnp.sin(x) @ x.T
    return x.sum()

  x = jnp.ones((16, 16))
  with timing.recording() as clock:
    with timing.phase("first call"):
      jax.block_until_ready(jax.jit(f)(x))
  b = clock.breakdown()
  assert b["compilations"] >= 1 and "f" in b["most_compile_time"]
  assert b["seconds"][timing.COMPILATION] > 0
  assert b["seconds"]["first call"] >= 0  # what is left is the run and the dispatch
  assert _sum(b) == pytest.approx(b["wall_seconds"], abs=0.01)


def test_nested_compile_spans_count_as_their_union():
  clock = timing.WallClock()
  clock.enter("p")
  clock.compiled(10.0, 11.0, "inner", backend=False)  # an inner trace, reported first
  clock.compiled(9.5, 12.0, "outer", backend=False)  # the outer trace holding it: 1.5 s more
  clock.compiled(20.0, 20.5, "outer")  # its XLA compilation
  clock.compiled(9.8, 10.5, "inner")  # already counted
  assert clock.seconds[timing.COMPILATION] == pytest.approx(3.0)
  assert clock.compilations == 2
  assert dict(clock.compiled_functions) == {"inner": [1, 1.0], "outer": [1, 2.0]}
  assert clock._spans == [(9.5, 12.0), (20.0, 20.5)]  # pylint: disable=protected-access


def test_two_open_recordings_both_see_a_phase():
  with timing.recording() as outer:
    with timing.recording() as inner:
      with timing.phase("shared"):
        time.sleep(0.02)
  assert outer.breakdown()["seconds"]["shared"] >= 0.02
  assert inner.breakdown()["seconds"]["shared"] >= 0.02


def test_the_process_age_and_a_launch_count_as_startup(monkeypatch):
  age = timing.process_age()
  assert age is not None and 0 < age < 10 * 24 * 3600  # this test process, started before
  with timing.recording(since_launch=True) as clock:
    pass
  assert timing.STARTUP not in clock.breakdown()["seconds"]  # not marked: not a launch
  monkeypatch.setattr(timing, "_LAUNCHED", [])
  timing.mark_launch()
  with timing.recording(since_launch=True) as clock:
    pass
  startup = clock.breakdown()["seconds"][timing.STARTUP]
  assert startup == pytest.approx(timing.process_age(), abs=0.1)


def test_timed_keeps_the_function_and_counts_its_calls():
  @timing.timed("work")
  def work(x):
    """Doc."""
    time.sleep(0.01)
    return x + 1

  assert work.__name__ == "work" and work.__doc__ == "Doc."
  with timing.recording() as clock:
    assert work(1) == 2
  assert clock.breakdown()["seconds"]["work"] >= 0.01


def test_the_breakdown_table_has_every_phase_and_the_rest():
  b = {"wall_seconds": 10.0, "seconds": {"training steps": 8.0, "compilation": 2.0},
       "fraction": {"training steps": 0.8, "compilation": 0.2}, "compilations": 3}
  text = timing.format_breakdown(b)
  assert "| training steps | 8.0 | 80.0% |" in text
  assert "| compilation | 2.0 | 20.0% |" in text
  assert "**all but training steps** | 2.0 | **20.0%**" in text


def test_the_loop_counts_steps_data_checkpoints_and_compilation(tmp_path):
  model = MLP(num_classes=3, hidden=(8,))
  tx = optax.sgd(0.1)
  images = np.random.default_rng(0).normal(size=(64, 4, 4, 1)).astype(np.float32)
  labels = np.arange(64) % 3
  mesh = mesh_lib.data_mesh()

  def init_fn():
    return step_lib.create_train_state(model, tx, jax.random.key(0), jnp.asarray(images[:2]))

  step_fn = jax.jit(lambda s, b: step_lib.train_step(
      s, b, jax.random.key(1), loss_fn=step_lib.ClassificationLoss(model.apply), tx=tx))

  def batch_fn(step):
    idx = (np.arange(16) + 16 * step) % 64
    return {"image": jnp.asarray(images[idx]), "label": jnp.asarray(labels[idx])}

  options = loop.LoopOptions(num_steps=20, log_every=5, checkpoint_every=10, progress=False)
  with timing.recording() as clock:
    loop.train_loop(init_fn, step_fn, batch_fn, str(tmp_path), options, mesh=mesh)
  b = clock.breakdown()
  for name in (timing.TRAINING, timing.DATA, timing.CHECKPOINTS, timing.COMPILATION):
    assert b["seconds"][name] > 0, name
  assert timing.OUTPUTS in b["seconds"]  # the metrics lines: milliseconds
  assert _sum(b) == pytest.approx(b["wall_seconds"], abs=0.01)


def test_machine_names_the_backend_and_the_cpu():
  m = timing.machine()
  assert m["backend"] == jax.default_backend() and m["devices"] == jax.device_count()
  assert m["cpu"] and m["cpu_cores"] >= 1
