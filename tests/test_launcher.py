"""experiments.main: --help, --list, --print_config, and a command line's faults in one line.

The command line's checks run in this process (`command_line_problem`, and `parse_flags`
where it refuses before absl parses anything); the launches (`slow`) check what a user sees.
"""

import re

import pytest

from experiments import catalogue
from experiments import main as launcher

QUICKTEST = "--config=experiments/configs/quickstart.py:quicktest"
TRAIN = "--config=experiments/configs/train.py:cpu_cue,quicktest"


@pytest.mark.parametrize("argv", [
    [QUICKTEST, "--workdir=/tmp/w", "--config.optimizer.learning_rate=0.1",
     "--config.path.num_t=3", "--config.model.kwargs.width=2"],
    ["--config", "experiments/configs/train.py", "--config.data.cue=dominoes"],
    ["--workdir=/tmp/w"],  # no --config: absl's and main's to refuse
    [TRAIN, "--config.dry_run", "--noconfig.data.download"],
])
def test_a_valid_command_line_has_no_problem(argv):
  assert launcher.command_line_problem(argv) is None


def test_a_misspelt_override_names_the_key_the_closest_and_the_sections_fields():
  problem = launcher.command_line_problem([QUICKTEST, "--config.seed=1", "--config.optimizer.lr=1"])
  assert problem == (
      "--config.optimizer.lr: config.optimizer has no field 'lr'; closest: "
      "optimizer.learning_rate, optimizer.name, optimizer.schedule; fields of config.optimizer: "
      "decay_every_epochs, decay_factor, learning_rate, momentum, name, schedule, warmup_steps, "
      "weight_decay")
  problem = launcher.command_line_problem(["--config", "experiments/configs/train.py",
                                           "--config.cue_proportion=0.5"])
  assert problem.startswith("--config.cue_proportion: config has no field 'cue_proportion'; "
                            "closest: data.cue_proportion")


def test_an_unknown_preset_or_config_file_is_named_with_the_valid_ones():
  problem = launcher.command_line_problem(["--config=experiments/configs/train.py:cpu_cu"])
  message, hint = problem.split("\n")
  assert message.startswith("Unknown preset 'cpu_cu'; valid presets: ['cpu_cue', 'cpu_nocue']")
  assert hint == catalogue.presets_hint("experiments/configs/train.py", "cpu_cu")
  assert "closest: cpu_cue" in hint
  problem = launcher.command_line_problem(["--config=experiments/configs/theory.py:default,fast"])
  assert problem.startswith("Unknown preset modifier 'fast'; valid modifiers: ['quicktest'].\n")
  problem = launcher.command_line_problem(["--config=experiments/configs/trian.py"])
  assert problem.startswith("--config: no config file 'experiments/configs/trian.py'; the "
                            "config files: experiments/configs/quickstart.py, ")


def test_parse_flags_refuses_in_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    launcher.parse_flags(["main.py", QUICKTEST, "--workdir=/tmp/w", "--config.num_tt=3"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: --config.num_tt: config has no field")


def test_the_docstring_absl_prints_for_help_names_every_preset():
  assert launcher.__doc__.endswith(catalogue.help_text())


@pytest.mark.slow
def test_help_and_list(launch):
  help_text = launch("--help", timeout=120)
  lines = help_text.stdout.splitlines()
  assert len(lines) <= 80, len(lines)
  assert "train.py (task train): cpu_cue cpu_nocue recall_lm" in help_text.stdout
  for preset in catalogue.config_file("train").module.paper_presets():
    assert re.search(rf"\b{preset}\b", help_text.stdout)
  assert "--print_config" in help_text.stdout and "--[no]list" in help_text.stdout
  listed = launch("--list", timeout=120)
  assert listed.returncode == 0 and listed.stdout.strip() == catalogue.list_text()


@pytest.mark.slow
def test_print_config_prints_the_config_after_overrides_and_writes_nothing(tmp_path, launch):
  proc = launch(TRAIN, "--config.seed=3", "--print_config", timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == (f"# {TRAIN} --config.seed=3 (task train, resolved for 1 devices)")
  assert "seed = 3" in lines and "data.num_train = 512" in lines
  refused = launch(TRAIN, "--config.optimizer.learning_rate=-1", "--print_config", timeout=120)
  assert refused.returncode == 1 and refused.stdout == ""
  assert refused.stderr.splitlines() == [
      "error: config.optimizer.learning_rate=-1.0 must be > 0."]
  verbose = launch(TRAIN, "--config.optimizer.learning_rate=-1", "--print_config",
                   "--verbosity=-1", timeout=120)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_command_line_faults_are_one_line(tmp_path, launch):
  workdir = f"--workdir={tmp_path / 'w'}"
  for args, message in [
      ([QUICKTEST, "--config.optimizer.lr=0.1"],
       "error: --config.optimizer.lr: config.optimizer has no field 'lr'; closest: "
       "optimizer.learning_rate"),
      ([QUICKTEST, "--config.num_epochs=abc"],
       "error: flag --config.num_epochs=abc: invalid literal for int() with base 10: 'abc'"),
      (["--config=experiments/configs/quickstart.py:huge"],
       "error: Unknown preset 'huge'; valid presets: ['default', 'quicktest'].\n"
       "presets of quickstart.py: default quicktest (--list shows every one); modifiers: "
       "quicktest"),
      ([QUICKTEST, "--workdri=x"], "error: Unknown command line flag 'workdri'")]:
    proc = launch(*args, workdir, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.splitlines()) == message.count("\n") + 1, proc.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_dry_run_prints_its_config_first(tmp_path, launch):
  proc = launch(TRAIN, f"--workdir={tmp_path / 'w'}", "--config.dry_run=True", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith(f"# {TRAIN} --config.dry_run=True (task train")
  assert lines.index("dry_run = True") < min(i for i, line in enumerate(lines)
                                             if line.startswith("DRY_RUN "))
  assert not (tmp_path / "w").exists()
