"""Sequence data for the tasks: the embedded language-modelling datasets and their model.

A `data.dataset` in `DATASETS` makes `train` fit a causal language model
(`model.name` in `MODELS`) on the masked next-token loss, and `eval_path`
evaluate the paths between two such runs with `OBJECTIVE` on their held-out
sequences (one eval set, `EVAL_SET`). What the tasks read of such a run comes
from here:

  - the `data` section: `dataset`, `num_train`, `num_test` (sequences; no -1:
    generated data has no whole split), `seed`, `pipeline` ('auto' or 'host':
    the device pipeline draws cued images only);
  - the splits: `recall_sequences(n, seed=2 * data.seed + tag)`, tag 0 for the
    training sequences and 1 for the held-out ones (a distinct seed per split,
    as the embedded image sets);
  - the model: `CausalLM(vocab_size, max_len=seq_len, **model.kwargs)`, which
    takes no `train` argument (mechconn calls it through
    `adapters.without_train`: see `specs.ModelSpec.apply_fn`).
"""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mechconn import adapters
from mechconn import mesh as mesh_lib
from mechconn import objectives
from mechconn import step as step_lib
from mechconn.data import sequences
from mechconn.models.transformer import CausalLM
from mechconn.types import ApplyFn, Batch, PRNGKey, StackedBatches

if typing.TYPE_CHECKING:  # specs imports this module
  from mechconn.tasks import specs

DATASETS = {"recall": sequences.TASK}  # name -> the task's sizes (mechconn.data.sequences)
MODELS = {"causal_lm": CausalLM}
DATA_FIELDS = ("vocab_size", "max_len")  # model attributes the dataset sets
PIPELINES = ("auto", "host")  # 'auto' is the host pipeline for sequences
OBJECTIVE = objectives.next_token()  # reads tokens[:, :-1], scores tokens[:, 1:] where masked
EVAL_SET = "test"  # the one eval set: the held-out sequences
RENORMALIZE = {"none": None, "repair": "repair"}  # path.renormalize -> evaluate_path's
_SPLIT_TAG = {"train": 0, "test": 1}


def is_sequence_data(dataset: str) -> bool:
  """Whether `dataset` names embedded sequences (else a base image dataset)."""
  return dataset in DATASETS


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
  """Token sequences and their target masks, both [n, L]; read as `data.steps` reads a split."""

  tokens: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  def examples(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """{'tokens', 'mask'} of the rows at idx."""
    return {"tokens": self.tokens[idx], "mask": self.mask[idx]}


def load_split(data: "specs.SequenceData", split: str, num_examples: int | None = None
               ) -> SequenceSplit:
  """The 'train' or 'test' sequences of a `data` section (its num_train / num_test rows,
  or the first `num_examples` of them)."""
  total = data.num_train if split == "train" else data.num_test
  generated = sequences.recall_sequences(total, seed=2 * data.seed + _SPLIT_TAG[split],
                                         task=DATASETS[data.dataset])
  rows = slice(None) if num_examples is None else slice(num_examples)
  return SequenceSplit(generated["tokens"][rows], generated["mask"][rows])


def input_shape(data: "specs.SequenceData") -> tuple[int]:
  """[L]: the length of one sequence of the dataset."""
  return (DATASETS[data.dataset].seq_len,)


def model_of(name: str, kwargs: dict, dataset: str, dtype: jnp.dtype | None) -> CausalLM:
  """The language model `name` with attributes `kwargs`, sized for the dataset's vocabulary
  and length."""
  task = DATASETS[dataset]
  return MODELS[name](vocab_size=task.vocab_size, max_len=task.seq_len, dtype=dtype, **kwargs)


def apply_fn_of(model: CausalLM) -> ApplyFn:
  """The model's apply as mechconn calls models (it takes no `train` argument)."""
  return adapters.without_train(model.apply)


def init_state(model: CausalLM, tx: optax.GradientTransformation, rng: PRNGKey,
               sample_tokens: jax.Array) -> step_lib.TrainState:
  """A fresh TrainState of the language model, initialised from `rng`."""
  return step_lib.fresh_state(model.init(rng, sample_tokens)["params"], tx)


def stack(split: SequenceSplit, batch_size: int, *, drop_remainder: bool = False
          ) -> StackedBatches:
  """{'tokens', 'mask'} [N, batch_size, L]; the last batch is padded with rows of mask 0
  (no targets), or dropped (`drop_remainder`: statistics batches, which padding would bias)."""
  n = len(split)
  num_batches = n // batch_size if drop_remainder else -(-n // batch_size)
  total = num_batches * batch_size

  def padded(a):
    a = a[:total]
    return np.concatenate([a, np.zeros((total - len(a), *a.shape[1:]), a.dtype)])

  return {k: padded(v).reshape(num_batches, batch_size, -1)
          for k, v in split.examples(np.arange(n)).items()}


def eval_sets(data: "specs.SequenceData", batch_size: int, mesh: jax.sharding.Mesh
              ) -> dict[str, StackedBatches]:
  """{EVAL_SET: the held-out sequences stacked}, each batch sharded over the mesh."""
  rows = mesh_lib.process_rows(batch_size)
  stacked = stack(load_split(data, "test"), batch_size)
  return {EVAL_SET: mesh_lib.shard_batch({k: v[:, rows] for k, v in stacked.items()}, mesh,
                                         batch_axis=1)}


def statistics_batches(data: "specs.SequenceData", num_examples: int, batch_size: int
                       ) -> StackedBatches:
  """{'tokens': [M, batch_size, L]}: full batches of the first `num_examples` training
  sequences, from which REPAIR's statistics are computed at every t."""
  stacked = stack(load_split(data, "train", num_examples), batch_size, drop_remainder=True)
  return {"tokens": stacked["tokens"]}


def as_sequences(zeros: Batch) -> Batch:
  """A dry run's zero {'image' [B, L], 'label'} batch -> {'tokens', 'mask'} of the same shape
  and placement (PAD tokens, every position a target)."""
  return {"tokens": zeros["image"].astype(jnp.int32),
          "mask": jnp.ones_like(zeros["image"], jnp.float32)}
