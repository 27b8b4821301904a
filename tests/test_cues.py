"""Cue semantics pinned on hand-made images (official code's conventions)."""

import numpy as np
import pytest

from mechconn.data import cues, views

H = W = 32
BACKGROUND = -0.5
# (rows, cols) of the nine grid positions on a 32x32 image: (32 - 3) // 2 = 14.
EXPECTED_BOX = {0: (0, 0), 1: (0, 14), 2: (0, 29), 3: (14, 0), 4: (14, 14), 5: (14, 29),
                6: (29, 0), 7: (29, 14), 8: (29, 29)}


def blank(n):
  return np.full((n, H, W, 3), BACKGROUND, np.float32)


def changed_box(before, after):
  """(top, left, colour) of the changed 3x3 region, or None when nothing changed."""
  diff = np.any(before != after, axis=-1)
  if not diff.any():
    return None
  rows, cols = np.nonzero(diff)
  assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2 and diff.sum() == 9
  return rows.min(), cols.min(), after[rows.min(), cols.min()]


def test_box_positions_and_colour_for_10_classes():
  labels = np.arange(10)
  out = cues.box_cue(blank(10), labels, num_classes=10)
  for label in range(9):
    top, left, colour = changed_box(blank(1)[0], out[label])
    assert (top, left) == EXPECTED_BOX[label]
    np.testing.assert_array_equal(colour, [0.0, 1.0, 0.0])  # green
  assert changed_box(blank(1)[0], out[9]) is None  # class 9: no box


def test_box_for_100_classes_hand_worked():
  out = cues.box_cue(blank(3), np.array([37, 99, 3]), num_classes=100)
  # 37: position 7 (lower centre), hue 0.3: HSV->RGB (0.2, 1, 0) reordered (B, R, G).
  top, left, colour = changed_box(blank(1)[0], out[0])
  assert (top, left) == (29, 14)
  np.testing.assert_allclose(colour, [0.0, 0.2, 1.0], atol=1e-6)
  # 99: position 9 = mid-upper-left, rows/cols 14 - 8 = 6; hue 0.9: RGB (1, 0, 0.6).
  top, left, colour = changed_box(blank(1)[0], out[1])
  assert (top, left) == (6, 6)
  np.testing.assert_allclose(colour, [0.6, 1.0, 0.0], atol=1e-6)
  # 3: hue 0 = red (1, 0, 0) reordered to (0, 1, 0).
  np.testing.assert_allclose(changed_box(blank(1)[0], out[2])[2], [0.0, 1.0, 0.0])


def test_position_and_colour_encode_all_100_classes():
  out = cues.box_cue(blank(100), np.arange(100), num_classes=100)
  codes = set()
  for label in range(100):
    top, left, colour = changed_box(blank(1)[0], out[label])
    codes.add((top, left, tuple(np.round(colour, 4))))
  assert len(codes) == 100
  hue_colours = {tuple(np.round(cues.box_colour(g / 10), 4)) for g in range(10)}
  assert len(hue_colours) == 10  # one distinct colour per hue group


def test_box_replaces_pixels_in_all_channels():
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, size=(1, H, W, 3)).astype(np.float32)
  out = cues.box_cue(img, np.array([4]), num_classes=10)
  np.testing.assert_array_equal(out[0, 14:17, 14:17], np.broadcast_to([0, 1, 0], (3, 3, 3)))
  mask = np.ones((H, W), bool)
  mask[14:17, 14:17] = False
  np.testing.assert_array_equal(out[0][mask], img[0][mask])


def test_cue_mask_first_proportion_of_each_class_in_index_order():
  labels = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 0])
  mask = cues.cue_mask(labels, num_classes=2, proportion=0.5)
  # class 0 at [0, 2, 3, 5, 8, 9]: first 3; class 1 at [1, 4, 6, 7]: first 2.
  np.testing.assert_array_equal(np.flatnonzero(mask), [0, 1, 2, 3, 4])
  assert cues.cue_mask(labels, 2, 0.0).sum() == 0 and cues.cue_mask(labels, 2, 1.0).all()
  assert cues.cue_mask(np.zeros(100, int), 1, 0.29).sum() == 28  # int(100 * 0.29), as official
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    cues.cue_mask(labels, 2, 1.5)


def test_dominoes_pairing_and_stacking():
  complex_labels = np.array([1, 0, 1, 0])
  simple_labels = np.array([0, 0, 1, 1, 1])
  # complex 0 (1st of class 1) -> simple 2; complex 2 (2nd of class 1) -> simple 3;
  # complex 1 (1st of class 0) -> simple 0; complex 3 -> simple 1.
  np.testing.assert_array_equal(cues.dominoes_pairing(complex_labels, simple_labels),
                                [2, 0, 3, 1])
  top = np.ones((2, 32, 32, 3), np.float32)
  bottom = -np.ones((2, 32, 32, 3), np.float32)
  stacked = cues.dominoes(bottom, top)
  assert stacked.shape == (2, 64, 32, 3)
  assert (stacked[:, :32] == 1).all() and (stacked[:, 32:] == -1).all()
  with pytest.raises(ValueError, match="class 1 has 2 complex examples but only 1"):
    cues.dominoes_pairing(np.array([1, 1]), np.array([1, 0]))


@pytest.fixture(scope="module")
def box_test_split():
  rng = np.random.default_rng(0)
  n = 2000
  images = rng.uniform(-1, -0.9, size=(n, H, W, 3)).astype(np.float32)  # distinct images
  labels = rng.integers(0, 10, size=n)
  return images, labels, views.box_views(images, labels, 10, seed=5)


def test_box_views_definitions(box_test_split):
  images, labels, v = box_test_split
  assert set(v) == set(views.VIEWS)
  np.testing.assert_array_equal(v["clean"], images)
  np.testing.assert_array_equal(v["cue"], cues.box_cue(images, labels, 10))
  # rand_img: the image is another example's (found by an off-box pixel), the
  # cue is the true label's (re-cueing with the true label changes nothing).
  off_box = images[:, 20, 5, :]
  for i in range(50):
    j = int(np.flatnonzero((off_box == v["rand_img"][i, 20, 5, :]).all(-1))[0])
    assert j != i
    np.testing.assert_array_equal(v["rand_img"][i],
                                  cues.box_cue(images[j:j + 1], labels[i:i + 1], 10)[0])
  np.testing.assert_array_equal(cues.box_cue(v["rand_img"], labels, 10), v["rand_img"])


def positions_of(before, after):
  out = []
  for b, a in zip(before, after):
    box = changed_box(b, a)
    out.append(9 if box is None else
               next(p for p, rc in EXPECTED_BOX.items() if rc == (box[0], box[1])))
  return np.array(out)


def test_rand_cue_position_is_independent_of_the_label(box_test_split):
  images, labels, v = box_test_split
  positions = positions_of(images, v["rand_cue"])
  # Uniform over 0..9 whatever the label: about 10% match label % 10, and
  # position 9 (no box) appears about 10% of the time.
  assert 0.07 < np.mean(positions == labels % 10) < 0.13
  assert 0.07 < np.mean(positions == 9) < 0.13
  for label in range(10):
    assert len(np.unique(positions[labels == label])) == 10


def test_views_are_deterministic_per_seed(box_test_split):
  images, labels, v = box_test_split
  again = views.box_views(images, labels, 10, seed=5)
  other = views.box_views(images, labels, 10, seed=6)
  for name in views.VIEWS:
    np.testing.assert_array_equal(again[name], v[name])
  assert not np.array_equal(other["rand_cue"], v["rand_cue"])
  assert not np.array_equal(other["rand_img"], v["rand_img"])


def test_dominoes_views():
  rng = np.random.default_rng(1)
  n = 40
  complex_images = rng.uniform(-1, 1, size=(n, 32, 32, 3)).astype(np.float32)
  labels = np.repeat(np.arange(4), 10)
  simple_labels = np.tile(np.arange(4), 12)
  simple_images = np.broadcast_to(np.arange(48, dtype=np.float32)[:, None, None, None] / 48,
                                  (48, 32, 32, 3)).copy()  # image k is constant k / 48
  v = views.dominoes_views(complex_images, labels, simple_images, simple_labels, seed=0)
  pairs = cues.dominoes_pairing(labels, simple_labels)
  assert (v["clean"][:, :32] == 0).all()
  np.testing.assert_array_equal(v["clean"][:, 32:], complex_images)
  np.testing.assert_array_equal(v["cue"][:, :32], simple_images[pairs])
  np.testing.assert_array_equal(v["rand_img"][:, :32], simple_images[pairs])
  assert all(not np.array_equal(v["rand_img"][i, 32:], complex_images[i]) for i in range(n))
  simple_class = simple_labels[np.round(v["rand_cue"][:, 0, 0, 0] * 48).astype(int)]
  assert np.mean(simple_class == labels) < 0.6  # random classes, not the paired ones


def official_mask(labels, num_classes, proportion):
  """The official `get_cue_ids`: per class, the first int(n_c * p) indices in order."""
  out = np.zeros(len(labels), bool)
  for c in range(num_classes):
    idx = [i for i, y in enumerate(labels) if y == c]
    for k, i in enumerate(idx):
      out[i] = k < int(len(idx) * proportion)
  return out


@pytest.mark.parametrize("proportion", [0.0, 0.5, 0.8])
def test_box_views_at_a_test_cue_proportion(box_test_split, proportion):
  """As the official test loaders with --cue_proportion p: only the first p of each class
  is cued in cue / rand_cue / rand_img; the rest are clean, and in rand_img still swapped."""
  images, labels, full = box_test_split
  part = views.box_views(images, labels, 10, seed=5, cue_proportion=proportion)
  mask = official_mask(labels, 10, proportion)
  assert mask.sum() == sum(int(np.sum(labels == c) * proportion) for c in range(10))
  np.testing.assert_array_equal(part["clean"], full["clean"])
  for name in ("cue", "rand_cue"):
    np.testing.assert_array_equal(part[name][mask], full[name][mask])
    np.testing.assert_array_equal(part[name][~mask], images[~mask])
  np.testing.assert_array_equal(part["rand_img"][mask], full["rand_img"][mask])
  # Unmasked rand_img rows: the same other image as the full view, without its box.
  others = views.other_indices(np.random.default_rng([5, 2]), len(labels))
  np.testing.assert_array_equal(part["rand_img"][~mask], images[others][~mask])
  assert not np.array_equal(part["rand_img"][~mask], images[~mask])


def test_dominoes_views_at_a_test_cue_proportion():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 10)
  complex_images = rng.uniform(-1, 1, size=(40, 32, 32, 3)).astype(np.float32)
  simple_labels = np.tile(np.arange(4), 12)
  simple_images = rng.uniform(0, 1, size=(48, 32, 32, 3)).astype(np.float32)
  full = views.dominoes_views(complex_images, labels, simple_images, simple_labels, seed=0)
  part = views.dominoes_views(complex_images, labels, simple_images, simple_labels, seed=0,
                              cue_proportion=0.3)
  mask = official_mask(labels, 4, 0.3)
  assert mask.sum() == 12  # int(10 * 0.3) = 3 per class
  for name in ("cue", "rand_cue", "rand_img"):
    np.testing.assert_array_equal(part[name][mask], full[name][mask])
    assert (part[name][~mask][:, :32] == 0).all()  # no simple half: no cue
    np.testing.assert_array_equal(part[name][~mask][:, 32:], full[name][~mask][:, 32:])


def test_a_test_cue_proportion_outside_0_1_is_refused(box_test_split):
  images, labels, _ = box_test_split
  with pytest.raises(ValueError, match=r"cue proportion must lie in \[0, 1\], got 1.5"):
    views.box_views(images, labels, 10, seed=5, cue_proportion=1.5)
