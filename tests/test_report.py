"""mechconn.report: the figures take PathEvals and the tasks' records, and draw what they hold."""

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from mechconn import barriers
from mechconn import report

TS = np.linspace(0.0, 1.0, 5)
VIEWS = ("clean", "cue", "rand_cue", "rand_img")


def _path_eval(shift: float) -> barriers.PathEval:
  loss = 0.5 + shift + np.sin(np.pi * TS)
  return barriers.PathEval.classification(TS, loss, np.clip(1.0 - loss / 3, 0, 1))


def _png_ok(path, fig) -> None:
  """A PNG of the figure's size in pixels, not blank."""
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(str(path))
  width, height = fig.get_size_inches() * 110
  assert image.shape[:2] == (round(height), round(width))
  assert image[..., :3].std() > 0.05


def _lines(ax) -> list[np.ndarray]:
  return [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]


def test_one_path_eval_is_a_loss_row_and_an_accuracy_row(tmp_path):
  result = _path_eval(0.0)
  fig = report.plot_path(result, str(tmp_path / "fig.png"))
  _png_ok(tmp_path / "fig.png", fig)
  loss_ax, acc_ax = fig.axes
  assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy")
  np.testing.assert_allclose(_lines(loss_ax), [result.loss])
  np.testing.assert_allclose(_lines(acc_ax), [result.accuracy])
  np.testing.assert_allclose(loss_ax.get_lines()[0].get_xdata(), TS)
  assert acc_ax.get_ylim() == (0.0, 1.02)
  assert loss_ax.get_legend() is None  # one unnamed line


def test_views_of_one_path_are_lines_of_one_panel():
  views = {v: _path_eval(i / 10) for i, v in enumerate(VIEWS)}
  fig = report.plot_path(views, metrics="loss")
  (ax,) = fig.axes
  np.testing.assert_allclose(_lines(ax), [views[v].loss for v in VIEWS])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == list(VIEWS)


def test_paths_of_views_are_columns_and_an_eval_path_record_adds_verdicts(tmp_path):
  paths = {name: {v: _path_eval(i + j / 10) for j, v in enumerate(VIEWS)}
           for i, name in enumerate(("linear", "linear (aligned)", "bezier"))}
  fig = report.plot_path(paths)
  assert len(fig.axes) == 6  # 2 metrics x 3 paths
  assert [ax.get_title() for ax in fig.axes[:3]] == ["linear", "linear (aligned)", "bezier"]
  assert all(len(ax.get_lines()) == 4 for ax in fig.axes)
  # The same curves as an eval_path record: lists, the record's ts, its verdicts in titles.
  record = {"ts": TS.tolist(), "paths": {
      name: {"kind": "linear", "mechanistically_connected": name == "linear",
             "broken_views": [] if name == "linear" else ["clean"],
             "views": {v: {"loss": np.asarray(r.loss).tolist(),
                           "accuracy": np.asarray(r.accuracy).tolist()} for v, r in views.items()}}
      for name, views in paths.items()}}
  fig = report.plot_path_views(record, str(tmp_path / "eval_path.png"))
  _png_ok(tmp_path / "eval_path.png", fig)
  assert fig.axes[0].get_title() == "linear\nmechanistically connected"
  assert fig.axes[1].get_title() == "linear (aligned)\nbroken: clean"
  for ax, name in zip(fig.axes[3:], paths):  # the accuracy row
    np.testing.assert_allclose(_lines(ax), [paths[name][v].accuracy for v in VIEWS], rtol=1e-6)
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), TS)


def test_any_objective_s_metrics_are_its_rows():
  result = barriers.PathEval(ts=TS, metrics={"squared_error": TS ** 2, "mae": TS})
  fig = report.plot_path({"linear": result, "aligned": result})
  assert [ax.get_ylabel() for ax in fig.axes] == ["squared_error", "mae"]


def test_what_is_not_a_path_result_is_refused():
  with pytest.raises(TypeError, match="Cannot plot"):
    report.plot_path([1.0, 2.0])
  with pytest.raises(TypeError, match="entry 'linear'"):
    report.plot_path({"linear": {"clean": "nope"}, "other": _path_eval(0.0)})


def test_finetune_paths_show_every_seed_their_mean_and_a_std_band(tmp_path):
  seeds = {"naive": [_path_eval(s / 10) for s in range(3)],
           "cbft": [{"loss": np.asarray(_path_eval(1 + s).loss).tolist(), "summary": {}}
                    for s in range(3)]}
  fig = report.plot_finetune_paths(seeds, str(tmp_path / "paths.png"), ts=TS)
  _png_ok(tmp_path / "paths.png", fig)
  (ax,) = fig.axes
  assert len(ax.get_lines()) == 2 * (1 + 3)  # per method: the mean and each seed
  assert len(ax.collections) == 2  # per method: the +-std band
  naive = np.stack([r.loss for r in seeds["naive"]])
  np.testing.assert_allclose(_lines(ax)[0], naive.mean(0))
  np.testing.assert_allclose(_lines(ax)[1:4], naive)
  band = ax.collections[0].get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose([band.min(), band.max()],
                             [(naive.mean(0) - naive.std(0)).min(),
                              (naive.mean(0) + naive.std(0)).max()], rtol=1e-6)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["naive (3 seeds)",
                                                                 "cbft (3 seeds)"]


def test_finetune_figures_of_a_reproduce_record():
  record = {"ts": TS.tolist(), "cue_model": {"views": {v: {"accuracy": 0.5} for v in VIEWS}},
            "methods": {m: {"path_loss_mean": (TS + i).tolist(),
                            "views": {v: {"mean": 0.6, "std": 0.1} for v in VIEWS}}
                        for i, m in enumerate(("naive", "cbft"))}}
  (ax,) = report.plot_finetune_paths(record).axes
  np.testing.assert_allclose(_lines(ax), [TS, TS + 1])  # the means only: no band
  assert not ax.collections
  (ax,) = report.plot_finetune_views(record).axes
  assert len(ax.patches) == 3 * len(VIEWS)  # bars: cue model and two methods, per view


def test_figures_leave_pyplot_alone():
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  backend, figures = matplotlib.get_backend(), plt.get_fignums()
  report.plot_path(_path_eval(0.0))
  report.save_view_grid({"clean": np.zeros((2, 4, 4, 3))}, np.array([0, 1]), None,
                        num_examples=2)
  assert (matplotlib.get_backend(), plt.get_fignums()) == (backend, figures)
