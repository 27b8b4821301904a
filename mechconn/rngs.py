"""Random streams, named in one place.

Every random draw in mechconn comes from the config's seed through one of
these tags (`jax.random.fold_in` for JAX keys, `np.random.default_rng([seed,
tag])` for host-side numpy draws), so two streams never share numbers by
accident and a reader can see what a seed drives:

  jax:   INIT (parameter initialisation), STEP (per-step randomness: the step
         folds in its step number, see `step.train_step`), SCRATCH_INIT (the
         scratch baseline's initialisation: never the cue model's own INIT key);
  numpy: epochs are shuffled with default_rng([seed, epoch])
         (`data.batching.epoch_permutation`); the fine-tuning study's clean and
         cue sets with default_rng([seed, CLEAN_CUE_SPLIT]); CBFT's cue batches
         are ordered with the seed `seed + CUE_BATCH_SEED_OFFSET`.

Two streams draw from the seed itself (kept so that published numbers
reproduce): `finetune.fit_head` initialises its head and keys its steps with
key(seed) itself, and `finetune.balanced_subset` (DFR) draws with
default_rng(seed). Embedded datasets and views take `data.seed` (see
`data.datasets`, `data.views`).
"""

import jax

INIT = 0
STEP = 1
CLEAN_CUE_SPLIT = 7
SCRATCH_INIT = 11
CUE_BATCH_SEED_OFFSET = 1000


def init_key(seed: int) -> jax.Array:
  """The key that initialises a run's parameters: fold_in(key(seed), INIT)."""
  return jax.random.fold_in(jax.random.key(seed), INIT)


def scratch_init_key(seed: int) -> jax.Array:
  """The scratch baseline's initialisation: fold_in(key(seed), SCRATCH_INIT)."""
  return jax.random.fold_in(jax.random.key(seed), SCRATCH_INIT)


def step_key(seed: int) -> jax.Array:
  """The root of a run's per-step randomness: fold_in(key(seed), STEP)."""
  return jax.random.fold_in(jax.random.key(seed), STEP)
