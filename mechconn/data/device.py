"""A cued split held on the devices, and its batches drawn there.

For data that fits in device memory (the embedded sets; CIFAR at 150 MB as
uint8) the host pipeline's work per step (gathering rows, normalising, drawing
the box or Dominoes cue: `pipeline.CueSplit.examples`) moves into one small
compiled program on the devices, so only the step's indices cross from the
host. `examples` gives bitwise the arrays of `CueSplit.examples`: every value
is copied from a table the host builds with the same functions, none is
computed on the device: the 256 normalised values of a uint8 pixel
(`datasets.normalize`; XLA would otherwise turn x / 255 into x * (1 / 255),
which differs in the last bit for 205 of the 256 values) and each label's box
(`cues.box_slices`, `cues.box_colour`).

  data = device.put(split, mesh.replicated(m))         # once
  batch = device.examples(data, global_indices)        # per step, on device
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mechconn import mesh as mesh_lib
from mechconn.data import cues
from mechconn.data import datasets
from mechconn.data import pipeline

# The normalised value of each uint8 pixel value, computed once on the host.
PIXEL_VALUES = datasets.normalize(np.arange(256, dtype=np.uint8))


@flax.struct.dataclass
class DeviceSplit:
  """A `pipeline.CueSplit` as device arrays, with the cue as lookup tables.

  Attributes:
    images: uint8 [n, H, W, C] base images.
    pixel_values: float32 [256], `PIXEL_VALUES`.
    labels: int32 [n].
    cued: bool [n], which examples carry the cue.
    box_masks: bool [K, H, W], the box of each label (box cue only, else None).
    box_colours: float32 [K, 3], its colour (box cue only, else None).
    simple: float32 [n, H, W, 3], each example's Dominoes top half (else None).
    kind: 'none', 'box' or 'dominoes'.
  """

  images: jax.Array
  pixel_values: jax.Array
  labels: jax.Array
  cued: jax.Array
  box_masks: jax.Array | None = None
  box_colours: jax.Array | None = None
  simple: jax.Array | None = None
  kind: str = flax.struct.field(pytree_node=False, default="none")


def box_tables(num_classes: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(masks bool [K, H, W], colours float32 [K, 3]): label k's box, as `cues.box_cue` draws it."""
  masks = np.zeros((num_classes, height, width), bool)
  colours = np.zeros((num_classes, 3), np.float32)
  labels = np.arange(num_classes)
  hues = cues.box_hue(labels, num_classes)
  for k in labels:
    box = cues.box_slices(int(k % 10), height, width, num_classes)
    if box is not None:
      masks[k, box[0], box[1]] = True
    colours[k] = cues.box_colour(hues[k])
  return masks, colours


def nbytes(split: pipeline.CueSplit) -> int:
  """Bytes the split takes on a device (images, labels, flags, Dominoes halves)."""
  total = split.images.nbytes + split.labels.nbytes + len(split)
  return total + (0 if split.simple is None else split.simple.nbytes)


def host_split(split: pipeline.CueSplit) -> DeviceSplit:
  """The `DeviceSplit` of a split as numpy arrays (to be placed, e.g. `mesh.replicate`)."""
  cued = (np.zeros(len(split), bool) if split.has_cue is None or split.kind == "none"
          else np.asarray(split.has_cue, bool))
  masks = colours = None
  if split.kind == "box":
    masks, colours = box_tables(split.num_classes, *split.images.shape[1:3])
  host = DeviceSplit(images=split.images, pixel_values=PIXEL_VALUES,
                     labels=np.asarray(split.labels, np.int32),
                     cued=cued, box_masks=masks, box_colours=colours,
                     simple=None if split.kind != "dominoes" else split.simple,
                     kind=split.kind)
  return host


def put(split: pipeline.CueSplit, sharding: jax.sharding.Sharding | None = None
        ) -> DeviceSplit:
  """The split on the devices of `sharding` (None: the default device), from every process."""
  host = host_split(split)
  return jax.device_put(host) if sharding is None else mesh_lib.put(host, sharding)


@functools.partial(jax.jit, static_argnames="out_sharding")
def examples(data: DeviceSplit, idx: jax.Array, out_sharding=None) -> dict[str, jax.Array]:
  """{'image', 'label'} of the examples at `idx` (any shape of indices), cues applied.

  Equals `CueSplit.examples(idx)` bitwise. `out_sharding` places the result
  (e.g. the batch sharding of the mesh); None follows the indices'.
  """
  images = data.pixel_values[data.images[idx].astype(jnp.int32)]  # datasets.normalize
  labels = data.labels[idx]
  cued = data.cued[idx]
  if data.kind == "box":
    where = data.box_masks[labels] & cued[..., None, None]
    images = jnp.where(where[..., None], data.box_colours[labels][..., None, None, :], images)
  elif data.kind == "dominoes":
    top = jnp.where(cued[..., None, None, None], data.simple[idx], 0.0).astype(jnp.float32)
    images = jnp.concatenate([top, images], axis=-3)
  out = {"image": images, "label": labels}
  if out_sharding is not None:
    out = jax.lax.with_sharding_constraint(out, out_sharding)
  return out
