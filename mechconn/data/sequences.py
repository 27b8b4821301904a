"""Embedded synthetic sequences: multi-query associative recall, a task that needs attention.

Each example lists n key-value pairs, then asks n queries, each for the value of
one of the example's keys:

  BOS k1 v1 k2 v2 ... kn vn SEP q1 a1 q2 a2 ... qn an EOS PAD ... PAD

The keys of one example are distinct (drawn without replacement from
`num_keys` key tokens), values are drawn with replacement from `num_values`
value tokens, each query q_i is one of the example's keys drawn uniformly and
independently, and each answer a_i is the value paired with q_i. Queries are
drawn with replacement so that no answer can be found by elimination: were
every key asked once, the last answer would be "the value not yet given", a
shortcut some training runs settle on instead of the lookup. n varies per
example in [min_pairs, max_pairs], so the pairs, the queries and the answers
sit at different positions in each example, and every row is padded to
`seq_len = 4 * max_pairs + 3`.

Why this task: an answer depends on which earlier position holds its query
key, which changes from example to example and from query to query, so no
fixed-position (bag of tokens or n-gram) rule solves it: a causal model must
look the query up (a previous-token head that binds each value to its key,
then a head that matches the query against the keys: an induction circuit).
A model that ignores the context gets 1 / num_values of the answers right by
chance. Asking n queries (multi-query recall, Arora et al. 2023, "Zoology")
rather than one gives n supervised answers per example, which shortens the
plateau before the lookup is learned.

Predictable targets are the answers a_i and the final EOS (`mask` = 1 there, 0
on the prompt, the queries and the padding). A next-token model is trained on
inputs tokens[:, :-1], targets tokens[:, 1:], weights mask[:, 1:].

Generated deterministically from a seed with vectorised numpy: no download.
"""

import dataclasses

import numpy as np

Sequences = dict[str, np.ndarray]  # {'tokens': int32 [N, L], 'mask': float32 [N, L]}

PAD, BOS, SEP, EOS = 0, 1, 2, 3
NUM_SPECIAL = 4  # keys, then values, follow the special tokens in the vocabulary


@dataclasses.dataclass(frozen=True)
class RecallTask:
  """The sizes of an associative-recall task.

  Attributes:
    num_keys: key tokens (>= max_pairs, since one example's keys are distinct).
    num_values: value tokens.
    min_pairs: fewest key-value pairs in an example (>= 1).
    max_pairs: most key-value pairs in an example.
  """

  num_keys: int = 8
  num_values: int = 8
  min_pairs: int = 2
  max_pairs: int = 5

  def __post_init__(self):
    if not 1 <= self.min_pairs <= self.max_pairs:
      raise ValueError(f"Need 1 <= min_pairs <= max_pairs, got min_pairs={self.min_pairs}, "
                       f"max_pairs={self.max_pairs}.")
    if self.num_keys < self.max_pairs:
      raise ValueError(f"num_keys={self.num_keys} is fewer than max_pairs={self.max_pairs}: "
                       "the keys of one example must be distinct.")
    if self.num_values < 1:
      raise ValueError(f"num_values must be >= 1, got {self.num_values}.")

  @property
  def vocab_size(self) -> int:
    """PAD, BOS, SEP, EOS, then the keys, then the values."""
    return NUM_SPECIAL + self.num_keys + self.num_values

  @property
  def seq_len(self) -> int:
    """BOS, max_pairs pairs, SEP, max_pairs queries and answers, EOS."""
    return 4 * self.max_pairs + 3

  def key_token(self, k):
    """Token of key index k (0-based)."""
    return NUM_SPECIAL + np.asarray(k)

  def value_token(self, v):
    """Token of value index v (0-based)."""
    return NUM_SPECIAL + self.num_keys + np.asarray(v)


TASK = RecallTask()
VOCAB_SIZE = TASK.vocab_size  # 20
SEQ_LEN = TASK.seq_len  # 23


def recall_sequences(num_examples: int, seed: int, task: RecallTask = TASK) -> Sequences:
  """`num_examples` multi-query associative-recall sequences, the same for the same seed.

  Args:
    num_examples: rows to generate.
    seed: seeds a `numpy.random.default_rng`; nothing else is random.
    task: the sizes (vocabulary, number of pairs).

  Returns:
    {'tokens': int32 [N, task.seq_len], 'mask': float32 [N, task.seq_len]};
    with SEP at position s = 2n + 1, mask is 1 at the answers (s + 2, s + 4,
    ..., s + 2n) and at the EOS (s + 2n + 1), 0 elsewhere.

  Example:
    >>> batch = recall_sequences(3, seed=0)
    >>> batch['tokens'].shape, batch['mask'].sum(1)  # n + 1 targets per row
    ((3, 23), array([6., 5., 5.], dtype=float32))
  """
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  rng = np.random.default_rng(seed)
  big_n = task.max_pairs
  num_pairs = rng.integers(task.min_pairs, task.max_pairs + 1, size=num_examples)
  # Distinct keys: the first max_pairs entries of a random permutation of the keys.
  keys = np.argsort(rng.random((num_examples, task.num_keys)), axis=1)[:, :big_n]
  values = rng.integers(0, task.num_values, size=(num_examples, big_n))
  # Which pair each query asks about: uniform over the n pairs, independently (with
  # replacement, so that no query can be answered by elimination).
  queried = np.floor(rng.random((num_examples, big_n)) * num_pairs[:, None]).astype(np.int64)

  position = np.arange(task.seq_len)[None, :]
  n = num_pairs[:, None]
  sep = 2 * n + 1
  in_pairs = (position >= 1) & (position < sep)
  pair = np.clip((position - 1) // 2, 0, big_n - 1)  # which pair a prompt position holds
  offset = position - sep - 1  # 0, 1, ... from the first query on
  in_queries = (offset >= 0) & (offset < 2 * n)

  def at(table, index):
    return np.take_along_axis(table, index, axis=1)

  asked = at(queried, np.clip(offset // 2, 0, big_n - 1))  # which pair a query position asks
  key_tokens, value_tokens = task.key_token(keys), task.value_token(values)
  pair_tokens = np.where((position - 1) % 2 == 0, at(key_tokens, pair), at(value_tokens, pair))
  query_tokens = np.where(offset % 2 == 0, at(key_tokens, asked), at(value_tokens, asked))
  eos = position == sep + 2 * n + 1
  tokens = np.select([position == 0, in_pairs, position == sep, in_queries, eos],
                     [BOS, pair_tokens, SEP, query_tokens, EOS], PAD)
  mask = (in_queries & (offset % 2 == 1)) | eos
  return {"tokens": tokens.astype(np.int32), "mask": mask.astype(np.float32)}
