"""Associative-recall sequences and the causal transformer LM: the data against its
definition, causality, the derived permutation spec (heads as units), and two trained
seeds whose linear path has a loss barrier."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mechconn import align
from mechconn import matching
from mechconn import symmetry
from mechconn.data import sequences
from mechconn.models import CausalLM

Params = chex.ArrayTree
Batch = dict[str, jax.Array]  # {'tokens': int32 [B, L], 'mask': float32 [B, L]}

TASK = sequences.TASK


# --- Training recipe (two seeds, well under a minute on 2 CPU cores). ----------------


def next_token_loss(logits_BxLxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy of next-token predictions, averaged over the targets.

  Position j's logits predict token j + 1, weighted by mask[:, j + 1] (1 on the
  answer and its EOS, 0 on the prompt and the padding).

  Returns:
    (mean cross-entropy, accuracy), both over the masked targets.
  """
  logits, targets = logits_BxLxV[:, :-1], batch["tokens"][:, 1:]
  weights = batch["mask"][:, 1:]
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = logits.argmax(-1) == targets
  total = weights.sum()
  return (cross_entropy * weights).sum() / total, (correct * weights).sum() / total


def train_lm(model: CausalLM, seed: int, *, task: sequences.RecallTask = TASK,
             steps: int = 1500, batch_size: int = 64, learning_rate: float = 3e-3,
             warmup_steps: int = 100) -> Params:
  """Trains `model` on fresh associative-recall batches; returns its params.

  The seed decides both the initialisation and the training sequences (every
  step sees `batch_size` new ones). Adam, a linear warm-up to `learning_rate`
  over `warmup_steps`, then a cosine decay to 0 at `steps`.
  """
  data = sequences.recall_sequences(steps * batch_size, seed=seed, task=task)
  batches = {k: v.reshape(steps, batch_size, -1) for k, v in data.items()}
  params = model.init(jax.random.key(seed), jnp.asarray(batches["tokens"][0]))["params"]
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps))

  # One jitted step; params and optimiser state are donated (updated in place).
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      return next_token_loss(model.apply({"params": p}, batch["tokens"]), batch)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for step in range(steps):
    params, opt_state, loss = train_step(params, opt_state,
                                         {k: v[step] for k, v in batches.items()})
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"Non-finite training loss {float(loss)} at the last step.")
  return params


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


# --- Two trained seeds. --------------------------------------------------------------


@pytest.mark.slow  # trains two LMs: about 25 s on 2 CPU cores
def test_two_seeds_learn_the_task_and_their_linear_path_has_a_barrier():
  model = CausalLM(TASK.vocab_size, TASK.seq_len, width=32, depth=2, num_heads=2, mlp_ratio=2)
  params_a, params_b = train_lm(model, seed=0), train_lm(model, seed=1)
  held_out = {k: jnp.asarray(v) for k, v in sequences.recall_sequences(2048, seed=10_000).items()}
  loss_at = jax.jit(lambda p: next_token_loss(model.apply({"params": p}, held_out["tokens"]),
                                              held_out))

  def midpoint(a, b):
    return jax.tree.map(lambda x, y: 0.5 * x + 0.5 * y, a, b)

  (loss_a, accuracy_a), (loss_b, accuracy_b) = loss_at(params_a), loss_at(params_b)
  assert accuracy_a > 0.9 and accuracy_b > 0.9, (accuracy_a, accuracy_b)
  assert not np.allclose(params_a["embed"]["kernel"], params_b["embed"]["kernel"])
  ends = max(float(loss_a), float(loss_b))
  loss_naive, _ = loss_at(midpoint(params_a, params_b))
  assert float(loss_naive) > 0.5 and float(loss_naive) > 10 * ends, (loss_naive, ends)

  # Weight matching with the derived spec: the aligned model is the same function, closer
  # to model a in weights. (How much it lowers the barrier is measured, not asserted.)
  spec = _derive(model, {"params": params_a}, held_out["tokens"][:2])
  perm = matching.weight_matching(spec, {"params": params_a}, {"params": params_b})
  aligned_b = align.apply_permutation(spec, perm, {"params": params_b})["params"]
  np.testing.assert_allclose(loss_at(aligned_b)[0], loss_b, rtol=1e-4, atol=1e-6)

  def inner(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert inner(params_a, aligned_b) > inner(params_a, params_b) + 10.0
