"""A task's optimiser and learning-rate schedule, from its typed `OptimizerSpec`."""

import jax.numpy as jnp
import optax

from mechconn import step as step_lib
from mechconn.tasks import specs


def make_optimizer(opt: specs.OptimizerSpec, *, num_steps: int, steps_per_epoch: int,
                   learning_rate: float | None = None, updates_per_step: int = 1,
                   hold_steps: int = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimiser, learning-rate schedule over the loop's steps) of an `optimizer` section.

  `learning_rate` replaces the section's peak learning rate when given. A step
  that makes `updates_per_step` optimiser updates (CBFT: a barrier and a clean
  update) runs all of them at the step's rate: optax advances a schedule once
  per update, so the optimiser's schedule reads its count // updates_per_step.
  The first `hold_steps` steps run at the schedule's start, from which it then
  runs (the official CBFT scheduler, stepped only after its warm-up).
  """
  schedule = step_lib.learning_rate_schedule(
      opt.schedule, opt.learning_rate if learning_rate is None else learning_rate,
      total_steps=num_steps, steps_per_epoch=steps_per_epoch,
      decay_every_epochs=opt.decay_every_epochs, decay_factor=opt.decay_factor,
      warmup_steps=opt.warmup_steps)
  per_step = schedule if not hold_steps else (
      lambda step: schedule(jnp.maximum(step - hold_steps, 0)))
  per_update = per_step if updates_per_step == 1 else (
      lambda count: per_step(count // updates_per_step))
  if opt.name == "adamw":  # momentum is Adam's b1
    return step_lib.adamw(per_update, b1=opt.momentum, weight_decay=opt.weight_decay), per_step
  return step_lib.sgd(per_update, momentum=opt.momentum,
                      weight_decay=opt.weight_decay), per_step
