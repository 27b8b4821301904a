"""Base datasets: embedded generators, TFDS via mock_data, normalisation."""

import numpy as np
import pytest

from mechconn.data import datasets, shapes


@pytest.mark.parametrize("generate", [shapes.shapes10, shapes.glyphs10])
def test_embedded_sets_are_deterministic_per_seed(generate):
  a, la = generate(3, 200)
  b, lb = generate(3, 200)
  c, _ = generate(4, 200)
  assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8 and la.dtype == np.int32
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(np.bincount(la, minlength=10), np.full(10, 20))


def test_shapes_differ_by_class_not_only_by_colour():
  # With noise off and fixed colours the class alone decides the foreground mask.
  images, labels = shapes.shapes10(0, 500, noise=0.0)
  foreground_fraction = np.array([np.mean(np.any(img != img[0, 0], axis=-1)) for img in images])
  by_class = [foreground_fraction[labels == c].mean() for c in range(10)]
  assert len({round(f, 2) for f in by_class}) >= 8  # shapes have different areas
  ring, disk = by_class[shapes.SHAPE_NAMES.index("ring")], by_class[shapes.SHAPE_NAMES.index("disk")]
  assert ring < disk


def test_load_base_embedded_splits_differ_and_sizes():
  xtr, ytr = datasets.load_base("shapes10", "train", num_examples=50)
  xte, _ = datasets.load_base("shapes10", "test", num_examples=50)
  assert not np.array_equal(xtr, xte) and len(ytr) == 50


def test_load_base_errors_list_valid_choices():
  with pytest.raises(ValueError, match="valid datasets"):
    datasets.load_base("imagenet", "train")
  with pytest.raises(ValueError, match="valid splits"):
    datasets.load_base("shapes10", "validation")


@pytest.mark.parametrize("name,shape,num_classes", [
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
    ("fashion_mnist", (28, 28, 1), 10), ("mnist", (28, 28, 1), 10)])
def test_tfds_datasets_with_mock_data(name, shape, num_classes):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    images, labels = datasets.load_base(name, "test")
  assert images.shape == (6,) + shape and images.dtype == np.uint8
  assert labels.dtype == np.int32 and ((0 <= labels) & (labels < num_classes)).all()


def test_missing_tfds_data_says_which_where_and_how(tmp_path):
  with pytest.raises(datasets.DatasetNotFoundError) as info:
    datasets.load_base("cifar10", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "'cifar10'" in message and str(tmp_path) in message and "tfds build cifar10" in message


def test_normalize_and_simple_half():
  x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(datasets.normalize(x).ravel(), [-1.0, 1.0, -0.6], atol=1e-6)
  gray = np.full((2, 28, 28, 1), 102, np.uint8)
  half = datasets.to_simple_half(gray)
  assert half.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(half, 0.4, atol=1e-6)  # a constant image stays constant


def test_embedded_data_is_generated_once_per_process_and_handed_out_as_copies(monkeypatch):
  calls = []
  real = datasets.EMBEDDED["glyphs10"]
  monkeypatch.setitem(datasets.EMBEDDED, "glyphs10",
                      lambda *a: calls.append(a) or real(*a))
  datasets._generated.cache_clear()  # pylint: disable=protected-access
  a_images, a_labels = datasets.load_base("glyphs10", "train", seed=7, num_examples=50)
  a_images[0] = 0  # a caller's copy: writable, and the cache is unchanged
  b_images, b_labels = datasets.load_base("glyphs10", "train", seed=7, num_examples=50)
  assert len(calls) == 1
  fresh_images, fresh_labels = real(14, 50)  # train: seed 2 * 7
  np.testing.assert_array_equal(b_images, fresh_images)
  np.testing.assert_array_equal(b_labels, fresh_labels)
  assert not np.array_equal(a_images, b_images)
  datasets.load_base("glyphs10", "test", seed=7, num_examples=50)
  assert len(calls) == 2  # another split: generated
  datasets._generated.cache_clear()  # pylint: disable=protected-access


def test_shapes_rendered_in_threads_equal_the_chunks_in_turn():
  n = 2 * shapes._CHUNK + 5  # pylint: disable=protected-access
  images, labels = shapes.shapes10(3, n)
  chunk = shapes._CHUNK  # pylint: disable=protected-access
  for i in range(3):  # each chunk from its own generator, as the serial definition
    expected = shapes._render_shapes(  # pylint: disable=protected-access
        np.random.default_rng([3, i]), labels[i * chunk:(i + 1) * chunk], 0.2, 4.5, 9.0, 0.2)
    np.testing.assert_array_equal(images[i * chunk:(i + 1) * chunk], expected)
