"""Cued splits, their views, and the batches a loop reads of them."""

import numpy as np
import pytest

from mechconn.data import cues, datasets, pipeline, views
from mechconn import report


@pytest.fixture(scope="module")
def base():
  images = np.full((40, 32, 32, 3), 64, np.uint8)
  labels = np.tile(np.arange(10), 4).astype(np.int32)
  return images, labels


def test_box_split_cues_exactly_the_masked_examples(base):
  images, labels = base
  split = pipeline.make_cue_split(images, labels, 10, "box", 0.5)
  data = split.examples(np.arange(40))
  clean = datasets.normalize(images)
  expected = clean.copy()
  expected[split.has_cue] = cues.box_cue(clean[split.has_cue], labels[split.has_cue], 10)
  np.testing.assert_array_equal(data["image"], expected)
  assert split.has_cue.sum() == 20  # 2 of 4 per class
  np.testing.assert_array_equal(data["label"], labels)


def test_dominoes_split_pairs_simple_images(base):
  images, labels = base
  simple_labels = np.repeat(np.arange(10), 5)
  simple_images = np.repeat((np.arange(50, dtype=np.uint8) * 5)[:, None, None, None], 32, 1)
  simple_images = np.repeat(np.repeat(simple_images, 32, 2), 3, 3)
  split = pipeline.make_cue_split(images, labels, 10, "dominoes", 0.5, simple_images,
                                  simple_labels)
  data = split.examples(np.arange(40))
  assert data["image"].shape == (40, 64, 32, 3)
  pairs = cues.dominoes_pairing(labels, simple_labels)
  for i in range(40):
    top = data["image"][i, :32]
    if split.has_cue[i]:
      np.testing.assert_allclose(top, simple_images[pairs[i]] / 255.0, atol=1e-6)
    else:
      assert (top == 0).all()


def test_unknown_cue_kind_raises(base):
  images, labels = base
  with pytest.raises(ValueError, match="valid kinds"):
    pipeline.CueSplit(images, labels, 10, kind="stripes")


def test_view_grid_png(tmp_path, base):
  images, labels = base
  path = tmp_path / "views.png"
  report.save_view_grid({"clean": datasets.normalize(images), "cue": datasets.normalize(images)},
                        labels, str(path), num_examples=4)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
  dom = np.concatenate([np.full((1, 32, 32, 3), 0.25), np.full((1, 32, 32, 3), -1.0)], axis=1)
  shown = report.displayable(dom)
  assert np.allclose(shown[0, :32], 0.25) and np.allclose(shown[0, 32:], 0.0)


def test_step_batches_walk_the_epoch_permutations(base):
  """A loop's batch at step s is rows of epoch s // steps_per_epoch's permutation,
  np.random.default_rng([seed, epoch]) (`batching.batch_indices_at_step`), partial batches
  dropped."""
  from mechconn import mesh as mesh_lib
  from mechconn.data import steps as data_steps
  images, labels = base
  split = pipeline.make_cue_split(images, labels, 10, "box", 0.5)
  batches = data_steps.StepBatches(split, 16, mesh_lib.data_mesh(), "host")
  for step in range(4):  # 2 per epoch
    epoch, i = divmod(step, 2)
    order = np.random.default_rng([3, epoch]).permutation(40)
    expected = split.examples(order[i * 16:(i + 1) * 16])
    batch = batches(3, step)
    np.testing.assert_array_equal(np.asarray(batch["image"]), expected["image"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), expected["label"])


def test_named_loaders_build_cued_splits_and_views():
  split = pipeline.load_train_split("shapes10", "box", 0.8, num_examples=200)
  x, y = datasets.load_base("shapes10", "train", num_examples=200)
  np.testing.assert_array_equal(split.images, x)
  np.testing.assert_array_equal(split.has_cue, cues.cue_mask(y, 10, 0.8))
  test_views, labels = pipeline.load_test_views("shapes10", "box", num_examples=30, seed=2)
  xt, yt = datasets.load_base("shapes10", "test", num_examples=30, seed=2)
  np.testing.assert_array_equal(labels, yt)
  expected = views.box_views(datasets.normalize(xt), yt, 10, seed=2)
  for name in views.VIEWS:
    np.testing.assert_array_equal(test_views[name], expected[name])
  dominoes, _ = pipeline.load_test_views("shapes10", "dominoes", num_examples=30,
                                         simple_dataset="glyphs10")
  assert dominoes["cue"].shape == (30, 64, 32, 3)
  with pytest.raises(ValueError, match="Unknown simple_dataset"):
    pipeline.load_test_views("shapes10", "dominoes", num_examples=30, simple_dataset="svhn")


def test_subset_sets_the_cue_on_all_or_none(base):
  images, labels = base
  split = pipeline.make_cue_split(images, labels, 10, "box", 0.5)
  idx = np.array([3, 0, 17])
  cued = split.subset(idx, cued=True).examples(np.arange(3))
  np.testing.assert_array_equal(
      cued["image"], cues.box_cue(datasets.normalize(images[idx]), labels[idx], 10))
  clean = split.subset(idx, cued=False).examples(np.arange(3))
  np.testing.assert_array_equal(clean["image"], datasets.normalize(images[idx]))
  np.testing.assert_array_equal(split.subset(idx).has_cue, split.has_cue[idx])
