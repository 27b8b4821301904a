"""Associative-recall sequences and the causal transformer LM: the data against its
definition, causality and the derived permutation spec (heads as units). Two trained
seeds and the barrier between them: docs/any_model.md (tests/test_docs.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mechconn import align
from mechconn import matching
from mechconn import symmetry
from mechconn.data import sequences
from mechconn.models import CausalLM


TASK = sequences.TASK


# --- The data. -----------------------------------------------------------------------


def _expected(tokens: np.ndarray, task: sequences.RecallTask) -> tuple[list[int], list[float]]:
  """The row the definition gives for the same pairs and queries, and its mask (a plain loop)."""
  sep = list(tokens).index(sequences.SEP)
  n = (sep - 1) // 2
  pairs = {int(tokens[i]): int(tokens[i + 1]) for i in range(1, sep, 2)}
  row = [sequences.BOS] + [int(t) for t in tokens[1:sep]] + [sequences.SEP]
  mask = [0.0] * len(row)
  for i in range(n):
    query = int(tokens[sep + 1 + 2 * i])
    row += [query, pairs[query]]
    mask += [0.0, 1.0]
  row.append(sequences.EOS)
  mask.append(1.0)
  padding = task.seq_len - len(row)
  return row + [sequences.PAD] * padding, mask + [0.0] * padding


def test_recall_sequences_are_deterministic_by_seed():
  a, b = sequences.recall_sequences(64, seed=3), sequences.recall_sequences(64, seed=3)
  for k in ("tokens", "mask"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens"], sequences.recall_sequences(64, seed=4)["tokens"])


def test_recall_sequences_shapes_dtypes_and_sizes():
  data = sequences.recall_sequences(5, seed=0)
  assert (sequences.VOCAB_SIZE, sequences.SEQ_LEN) == (20, 23)
  assert data["tokens"].shape == data["mask"].shape == (5, sequences.SEQ_LEN)
  assert data["tokens"].dtype == np.int32 and data["mask"].dtype == np.float32
  assert 0 <= data["tokens"].min() and data["tokens"].max() < sequences.VOCAB_SIZE
  task = sequences.RecallTask(num_keys=5, num_values=3, min_pairs=1, max_pairs=4)
  assert (task.vocab_size, task.seq_len) == (12, 19)
  assert sequences.recall_sequences(2, seed=0, task=task)["tokens"].shape == (2, 19)


@pytest.mark.parametrize("task", [TASK, sequences.RecallTask(num_keys=4, num_values=2,
                                                             min_pairs=1, max_pairs=4)])
def test_tokens_and_mask_follow_the_task_definition(task):
  data = sequences.recall_sequences(300, seed=1, task=task)
  keys = set(range(sequences.NUM_SPECIAL, sequences.NUM_SPECIAL + task.num_keys))
  values = set(range(sequences.NUM_SPECIAL + task.num_keys, task.vocab_size))
  num_pairs, asked = [], set()
  for tokens, mask in zip(data["tokens"], data["mask"]):
    row, expected_mask = _expected(tokens, task)
    np.testing.assert_array_equal(tokens, row)
    np.testing.assert_array_equal(mask, expected_mask)
    n = (list(tokens).index(sequences.SEP) - 1) // 2
    example_keys = [int(t) for t in tokens[1:2 * n:2]]
    assert set(example_keys) <= keys and len(set(example_keys)) == n  # distinct keys
    assert {int(t) for t in tokens[2:2 * n + 1:2]} <= values
    num_pairs.append(n)
    queries = tokens[2 * n + 2:4 * n + 2:2]
    asked |= {(n, i, example_keys.index(int(q))) for i, q in enumerate(queries)}
  # n varies over its whole range, and every query asks about every pair position.
  assert set(num_pairs) == set(range(task.min_pairs, task.max_pairs + 1))
  assert {(i, pair) for n, i, pair in asked if n == task.max_pairs} == {
      (i, pair) for i in range(task.max_pairs) for pair in range(task.max_pairs)}


def test_a_task_whose_keys_cannot_be_distinct_is_rejected():
  with pytest.raises(ValueError, match="num_keys=3 is fewer than max_pairs=4"):
    sequences.RecallTask(num_keys=3, max_pairs=4)


# --- The model. ----------------------------------------------------------------------

SMALL = dict(vocab_size=sequences.VOCAB_SIZE, max_len=sequences.SEQ_LEN, width=12, depth=2,
             num_heads=3, mlp_ratio=2)


@pytest.fixture(scope="module")
def small():
  model = CausalLM(**SMALL)
  tokens = jnp.asarray(sequences.recall_sequences(4, seed=0)["tokens"])
  variables = model.init(jax.random.key(0), tokens)
  return model, variables, tokens


def _derive(model, variables, tokens):
  # derive_spec calls apply_fn(variables, x, train=False, ...); CausalLM takes no `train`.
  return symmetry.derive_spec(lambda v, x, train=False, **kw: model.apply(v, x, **kw),
                              variables, tokens)


def test_logits_are_batch_by_length_by_vocab(small):
  model, variables, tokens = small
  assert model.apply(variables, tokens).shape == (4, sequences.SEQ_LEN, sequences.VOCAB_SIZE)
  assert model.apply(variables, tokens[:, :5]).shape == (4, 5, sequences.VOCAB_SIZE)
  with pytest.raises(ValueError, match="exceed max_len 23"):
    model.apply(variables, jnp.zeros((1, 24), jnp.int32))


def test_the_model_is_causal(small):
  model, variables, tokens = small
  logits = model.apply(variables, tokens)
  for j in (0, 5, sequences.SEQ_LEN - 1):
    changed = tokens.at[:, j].set((tokens[:, j] + 7) % sequences.VOCAB_SIZE)
    new = model.apply(variables, changed)
    np.testing.assert_allclose(new[:, :j], logits[:, :j], atol=1e-6)
    assert np.abs(new[:, j] - logits[:, j]).min(axis=-1).max() > 1e-4


def test_the_derived_spec_permutes_the_stream_heads_and_hidden_units(small):
  model, variables, tokens = small
  spec = _derive(model, variables, tokens)
  stream = "P_embed"
  expected = {stream}
  for i in range(SMALL["depth"]):
    attention = f"params/Block_{i}/attention"
    heads, qk, v = (f"P_Block_{i}/attention/query:1", f"P_Block_{i}/attention/query",
                    f"P_Block_{i}/attention/value")
    # Heads are one group over q, k, v and the output projection; within a head,
    # q and k share a permutation of their dimensions, v has its own.
    assert spec.axes[f"{attention}/query/kernel"] == (stream, heads, qk)
    assert spec.axes[f"{attention}/key/kernel"] == (stream, heads, qk)
    assert spec.axes[f"{attention}/value/kernel"] == (stream, heads, v)
    assert spec.axes[f"{attention}/out/kernel"] == (heads, v, stream)
    assert spec.axes[f"params/Block_{i}/mlp_in/kernel"] == (stream, f"P_Block_{i}/mlp_in")
    expected |= {heads, qk, v, f"P_Block_{i}/mlp_in"}
  assert set(spec.names) == expected
  # Tokens (the embedding's rows), positions and logits are never permuted.
  assert spec.axes["params/embed/kernel"] == (None, stream)
  assert spec.axes["params/position"] == (None, stream)
  assert spec.axes["params/head/kernel"] == (stream, None)
  sizes = align.group_sizes(spec, variables["params"])
  assert sizes[stream] == 12 and sizes["P_Block_0/attention/query:1"] == 3
  assert sizes["P_Block_0/attention/query"] == sizes["P_Block_0/attention/value"] == 4
  assert sizes["P_Block_1/mlp_in"] == 24


def test_a_random_permutation_of_the_derived_groups_leaves_the_logits_unchanged(small):
  model, variables, tokens = small
  spec = _derive(model, variables, tokens)
  permuted = align.apply_permutation(spec, align.random_permutation(spec, variables, 0),
                                     variables)
  assert not np.array_equal(permuted["params"]["embed"]["kernel"],
                            variables["params"]["embed"]["kernel"])
  np.testing.assert_allclose(model.apply(permuted, tokens), model.apply(variables, tokens),
                             atol=2e-5, rtol=2e-5)


def test_weight_matching_recovers_a_planted_permutation_exactly(small):
  model, variables, tokens = small
  spec = _derive(model, variables, tokens)
  planted = align.random_permutation(spec, variables, seed=1)
  other = align.apply_permutation(spec, planted, variables)
  perm = matching.weight_matching(spec, variables, other)
  aligned = align.apply_permutation(spec, perm, other)
  chex.assert_trees_all_equal(aligned, variables)
