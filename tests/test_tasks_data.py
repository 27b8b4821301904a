"""tasks.data: a data section loaded; the fine-tuning clean and cue sets of a training split."""

import numpy as np
import pytest

from mechconn.data import pipeline
from mechconn.tasks import data as task_data


@pytest.fixture(scope="module")
def split():
  images = np.random.default_rng(0).integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
  labels = np.tile(np.arange(10), 6).astype(np.int32)
  return pipeline.make_cue_split(images, labels, 10, "box", 0.5)


def test_clean_and_cue_sets_are_disjoint_draws_of_the_split(split):
  clean, cue = task_data.split_clean_and_cue(split, 20, 30, seed=1)
  assert (len(clean), len(cue)) == (20, 30)
  assert not clean.has_cue.any() and cue.has_cue.all()  # all_cued: every cue example cued
  clean_rows = {img.tobytes() for img in clean.images}
  assert not clean_rows & {img.tobytes() for img in cue.images}  # disjoint
  assert clean_rows <= {img.tobytes() for img in split.images}
  again, _ = task_data.split_clean_and_cue(split, 20, 30, seed=1)
  other, _ = task_data.split_clean_and_cue(split, 20, 30, seed=2)
  np.testing.assert_array_equal(again.images, clean.images)  # a function of the seed
  assert not np.array_equal(other.images, clean.images)


def test_the_cue_set_as_split_keeps_the_splits_cue_flags(split):
  _, cue = task_data.split_clean_and_cue(split, 20, -1, seed=1, cue_set="as_split")
  assert len(cue) == 40 and 0 < cue.has_cue.sum() < 40  # -1: the rest, about half cued


def test_sets_that_do_not_fit_are_refused_naming_the_fields(split):
  assert task_data.set_sizes(60, 20, -1) == 40
  with pytest.raises(ValueError, match=r"config.finetune.num_clean=50 \+ finetune.num_cue=20 "
                                       r"exceed the 60 training examples"):
    task_data.set_sizes(60, 50, 20)
  with pytest.raises(ValueError, match=r"config.finetune.cbft.cue_set='some'"):
    task_data.split_clean_and_cue(split, 20, 30, seed=1, cue_set="some")


def test_bn_batches_are_full_batches_of_images():
  examples = {"image": np.arange(10 * 2, dtype=np.float32).reshape(10, 2),
              "label": np.zeros(10, np.int32)}
  batches = task_data.bn_batches_of(examples, 4)
  assert set(batches) == {"image"} and batches["image"].shape == (2, 4, 2)
  np.testing.assert_array_equal(batches["image"].reshape(8, 2), examples["image"][:8])
