"""tasks.records: configs recorded by earlier versions read in today's fields.

Every task's old workdir resumes (its recorded config compares equal to today's
preset) or is refused naming the field that differs.
"""

import pytest

from experiments.configs import finetune as finetune_configs
from experiments.configs import fit_curve as fit_curve_configs
from experiments.configs import reproduce as reproduce_configs
from experiments.configs import theory as theory_configs
from experiments.configs import train as train_configs
from mechconn import workdir as workdir_lib
from mechconn.tasks import records
from mechconn.tasks import specs


def _today(config):
  return workdir_lib.config_to_dict(config)


def _differences(recorded, config):
  return workdir_lib.config_differences(recorded, _today(config), records.VOCABULARY)


def test_a_theory_run_recorded_with_top_level_num_t_and_seeds_resumes():
  config = theory_configs.get_config("default")
  old = _today(config)
  old["num_t"], old["seeds"] = old.pop("path")["num_t"], old.pop("num_seeds")
  assert _differences(old, config) == []
  old["num_t"] = 5
  assert _differences(old, config) == ["path.num_t"]  # named by today's field


def test_a_finetune_run_recorded_in_the_old_vocabulary_resumes():
  config = finetune_configs.get_config("cbft")
  old = _today(config)
  old["test_cue_proportion"] = old.pop("data")["test_cue_proportion"]
  old["finetune"].update(eval_batch_size=512, eval_every_steps=0)  # fields since removed
  del old["finetune"]["per_device_batch_size"], old["finetune"]["optimizer"]["warmup_steps"]
  del old["finetune"]["cbft"]["cue_set"]
  assert _differences(old, config) == []
  old["test_cue_proportion"] = 0.8
  assert _differences(old, config) == ["data.test_cue_proportion"]


def test_a_study_recorded_before_its_cue_models_dry_run_field_resumes():
  config = reproduce_configs.get_config("cpu")
  old = _today(config)
  del old["train"]["dry_run"], old["train"]["optimizer"]["warmup_steps"]
  del old["finetune"]["per_device_batch_size"]
  old["finetune"]["eval_batch_size"] = 128
  assert _differences(old, config) == []


def test_a_fit_curve_recorded_before_every_loop_had_its_fields_resumes():
  config = fit_curve_configs.get_config("cpu_clean")
  old = _today(config)
  del old["optimizer"]["warmup_steps"], old["allow_identical_endpoints"]
  assert _differences(old, config) == []
  old["allow_identical_endpoints"] = True
  assert _differences(old, config) == ["allow_identical_endpoints"]


def test_a_recorded_train_run_reads_as_a_spec_with_what_it_did():
  """A finished train run read as an input: the fields added since get the values that
  do what the run did (no default anywhere below the boundary)."""
  old = _today(train_configs.get_config("cpu_cue"))
  del old["model"]["dtype"], old["optimizer"]["warmup_steps"]
  del old["data"]["test_cue_proportion"]
  upgraded = records.upgrade(old)
  assert upgraded["model"]["dtype"] == "float32"
  assert upgraded["optimizer"]["warmup_steps"] == 0
  data = specs.data_spec(specs.section(upgraded["data"]), "train")
  assert data.test_cue_proportion == 1.0
  assert "dtype" not in old["model"]  # the record itself is left as it was


def test_a_section_without_a_field_is_refused_not_defaulted():
  config = train_configs.get_config("cpu_cue")
  with config.unlocked():
    del config.optimizer.warmup_steps
  with pytest.raises(AttributeError, match="warmup_steps"):
    specs.optimizer_spec(config.optimizer)


def test_the_mark_of_a_recorded_input_is_not_a_difference():
  """A train run relaunched since records the mark; the identities recorded by the runs that
  read it before do not."""
  config = finetune_configs.get_config("cbft")
  identity = {"config": _today(train_configs.get_config("cpu_cue")), "step": 8}
  old = {**_today(config), "inputs": {"cue_model": identity}}
  marked = {**identity, "config": {**identity["config"], workdir_lib.FORMAT_KEY: 1}}
  now = {**_today(config), "inputs": {"cue_model": marked}}
  assert workdir_lib.config_differences(old, now, records.VOCABULARY) == []


def test_recorded_curves_are_compared_item_by_item_in_todays_fields():
  """eval_path records the curves it read as a list: each item is read in today's fields, so
  a curve relaunched (and re-recorded with the fields added since) is still the same curve."""
  curve = _today(fit_curve_configs.get_config("cpu_clean"))
  old_curve = {**curve, "optimizer": dict(curve["optimizer"])}
  del old_curve["optimizer"]["warmup_steps"], old_curve["allow_identical_endpoints"]
  old = {"task": "eval_path", "inputs": {"curves": [{"config": old_curve, "step": 32}]}}
  now = {"task": "eval_path", "inputs": {"curves": [{"config": curve, "step": 32}]}}
  assert workdir_lib.config_differences(old, now, records.VOCABULARY) == []
  now["inputs"]["curves"][0]["step"] = 48
  assert workdir_lib.config_differences(old, now, records.VOCABULARY) == [
      "inputs.curves.0.step"]


def test_a_cue_model_recorded_before_the_data_pipeline_field_reads_as_auto():
  old = _today(train_configs.get_config("cpu_cue"))
  del old["data"]["pipeline"]
  data = specs.data_spec(specs.section(records.upgrade(old)["data"]), "finetune")
  assert data.pipeline == "auto"


def test_a_setting_no_recorded_run_used_takes_the_current_value_even_none():
  old = {"task": "reproduce", "finetune": {"naive": {"learning_rate": 0.01}}}
  now = {"task": "reproduce", "finetune": {"naive": {"learning_rate": 0.01},
                                           "scratch": {"learning_rate": None}}}
  assert records.upgrade(old, now)["finetune"]["scratch"] == {"learning_rate": None}
  assert workdir_lib.config_differences(old, now, records.VOCABULARY) == []
