"""tasks.specs: config sections resolved into frozen, typed values, each field checked."""

import dataclasses

import jax.numpy as jnp
import ml_collections
import pytest

from experiments.configs import common
from experiments.configs import eval_path as eval_path_configs
from experiments.configs import train as train_configs
from mechconn.data import datasets
from mechconn.tasks import specs


def _train():
  return train_configs.get_config("cpu_cue,quicktest")


def test_a_loop_resolves_its_global_batch_and_refuses_what_cannot_run():
  config = _train()
  with config.unlocked():
    config.per_device_batch_size = 4
  loop = specs.loop_spec(config, num_devices=8, num_examples=512)
  assert loop.batch_size == 32 and loop.steps(512) == (16, 32)
  assert loop.optimizer.learning_rate == config.optimizer.learning_rate
  with pytest.raises(dataclasses.FrozenInstanceError):
    loop.batch_size = 64  # a spec is a value
  config.per_device_batch_size = 0
  config.batch_size = 30
  with pytest.raises(ValueError, match=r"config.batch_size"):
    specs.loop_spec(config, num_devices=8, num_examples=512)  # 30 over 8 devices
  config.batch_size = 32
  with pytest.raises(ValueError, match=r"config.batch_size=32 exceeds the 16 training"):
    specs.loop_spec(config, num_devices=1, num_examples=16)
  config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", 32
  with pytest.raises(ValueError, match=r"warmup_steps=32 must be fewer than the run's 32"):
    specs.loop_spec(config, num_devices=1, num_examples=512)


def test_a_path_names_evaluate_paths_renormalisation():
  path = common.path_section(num_t=5, bn_examples=64)
  assert specs.path_spec(path) == specs.PathSpec(num_t=5, bn_examples=64, renormalize="auto")
  path.bn_variance = "unbiased"
  assert specs.path_spec(path).renormalize == "batchnorm_unbiased"
  lm = eval_path_configs.get_config("recall_lm,repair").path
  assert specs.path_spec(lm, sequence=True).renormalize == "repair"
  theory = ml_collections.ConfigDict({"num_t": 3})
  assert specs.path_spec(theory, statistics=False) == specs.PathSpec(3, 0, None)


def test_data_resolves_sizes_and_refuses_sequences_where_the_task_has_no_language_model():
  config = _train()
  config.data.num_train = -1
  data = specs.data_spec(config.data, "train")
  assert not data.is_sequence and data.num_train == -1
  assert data.num_train_examples == datasets.info("shapes10").train_size
  assert dataclasses.replace(data, cue="dominoes").input_shape == (64, 32, 3)
  lm = train_configs.get_config("recall_lm").data
  assert specs.data_spec(lm, "eval_path").is_sequence
  with pytest.raises(ValueError, match=r"'recall' is a sequence dataset; the fit_curve task "
                                       r"takes image datasets only"):
    specs.data_spec(lm, "fit_curve")


def test_a_model_is_sized_for_its_data_and_checked_against_its_attributes():
  config = _train()
  model = specs.model_spec(config.model, dataset="shapes10")
  assert model.num_classes == 10 and not model.is_sequence
  assert model.build().num_classes == 10
  config.model.dtype = "bfloat16"
  assert specs.model_spec(config.model, dataset="shapes10").build().dtype == jnp.bfloat16
  with config.unlocked():
    config.model.kwargs.depth = 3
  with pytest.raises(ValueError, match=r"config.model.kwargs has \['depth'\], not attributes "
                                       r"of small_cnn"):
    specs.model_spec(config.model, dataset="shapes10")
  lm = train_configs.get_config("recall_lm").model
  spec = specs.model_spec(lm, dataset="recall")
  assert spec.is_sequence and spec.build().vocab_size > 0
  with pytest.raises(ValueError, match=r"config.model.name='causal_lm'"):
    specs.model_spec(lm, dataset="shapes10")  # a language model needs sequence data
