"""experiments.catalogue: every config file, preset, modifier and field, described and listed."""

import re

import ml_collections
import pytest

from experiments import catalogue
from mechconn import tasks

FILES = catalogue.config_files()
PRESETS = [(f, p) for f in FILES for p in f.presets]
PAPER = catalogue.config_file("train").module.paper_presets()


def _leaves(config, prefix=""):
  """{dotted path: value}, made here (not by the catalogue) to check it."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _section(text: str, file) -> str:
  """A config file's part of the reference."""
  return text.split(f"## `{file.name}.py`")[1].split("\n## ")[0]


def test_every_config_file_and_task_is_catalogued(repo):
  on_disk = {p.stem for p in (repo / "experiments" / "configs").glob("*.py")}
  assert on_disk - {"__init__", "common"} == set(catalogue.FILES)
  assert {f.task for f in FILES} == set(tasks.TASKS)
  for file in FILES:
    assert file.summary and file.presets and file.modifiers
    assert file.summary == file.module.__doc__.strip().splitlines()[0]


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_presets_build_and_the_first_is_the_default(file):
  default = file.module.get_config()
  assert default.to_dict() == file.module.get_config(file.default).to_dict()
  for preset, line in {**file.presets, **file.modifiers}.items():
    assert line.strip() and "\n" not in line, preset
  for preset in file.presets:
    assert file.module.get_config(preset).task == file.task
  for modifier in file.modifiers:  # each modifier applies to some preset
    assert any(_builds(file, f"{p},{modifier}") for p in file.presets), modifier


def _builds(file, preset) -> bool:
  try:
    file.module.get_config(preset)
  except ValueError:
    return False
  return True


def test_paper_families_generate_their_lines():
  train = catalogue.config_file("train")
  assert train.presets["cifar10_box80_vgg13"] == (
      "CIFAR-10, box cue on 80% of each class, VGG-13, the paper's recipe")
  assert train.presets["cifar100_box0_resnet18"].startswith("CIFAR-100, no cue (p = 0")
  assert "Dominoes" in train.presets["cifar10_dominoes60_vgg13"]
  fit = catalogue.config_file("fit_curve").presets
  assert set(fit) == {"cpu_clean", "cpu_cue"} | {f"{p}_{s}" for p in PAPER
                                                 for s in ("clean", "cue")}
  assert "refused as identical" in fit["cifar10_box0_vgg13_cue"]
  assert "refused as identical" not in fit["cifar10_box80_vgg13_cue"]
  assert set(catalogue.config_file("reproduce").presets) >= set(PAPER)


@pytest.mark.parametrize("file, preset", PRESETS, ids=lambda x: getattr(x, "name", x))
def test_every_field_has_its_value_and_a_description(file, preset):
  fields = catalogue.fields(file.name, preset)
  assert {f.path: f.value for f in fields} == _leaves(file.module.get_config(preset))
  assert [f.path for f in fields if not f.description.strip()] == []


@pytest.mark.parametrize("name, preset, path, description", [
    ("finetune", "cbft", "finetune.cbft.margin", "m in |m - CE| of the barrier step"),
    ("reproduce", "cpu", "seed", "draws the clean and cue sets"),
    ("reproduce", "cpu", "train.seed", "model init, data order and step randomness"),
    ("reproduce", "cpu", "train.task", "runs mechconn.tasks.train"),
    ("reproduce", "cpu", "task", "runs mechconn.tasks.reproduce"),
    ("train", "recall_lm", "data.num_train", "training sequences"),
    ("train", "cpu_cue", "data.num_train", "training examples; -1: the whole split"),
    ("eval_path", "recall_lm", "data.num_test", "held-out sequences (the eval set 'test')"),
    ("fit_curve", "cpu_clean", "data.cue_proportion",
     "The cue proportion of the data the curve is fitted on (clean: 0, cue: 1)."),
    ("train", "cifar10_box80_vgg13", "eval_every_steps", "evaluate this often; 0: only at the end"),
])
def test_descriptions_come_from_the_assignment_that_sets_the_field(name, preset, path,
                                                                   description):
  fields = {f.path: f.description for f in catalogue.fields(name, preset)}
  assert fields[path] == description


def test_a_field_no_comment_describes_takes_its_sections():
  fields = {f.path: f.description for f in catalogue.fields("eval_path", "cpu")}
  assert fields["path.bn_examples"].startswith("training examples for the BatchNorm")
  assert fields["endpoint_model.kwargs.width"].startswith("an entry of endpoint_model.kwargs: ")
  lm = {f.path: f.description for f in catalogue.fields("eval_path", "recall_lm")}
  assert lm["path.bn_examples"].startswith("Training sequences for REPAIR's statistics")


@pytest.fixture(scope="module")
def reference() -> str:
  return catalogue.reference_markdown()


def _tables(text: str) -> dict[str, dict[str, str]]:
  """{heading: {first cell: row}} of each table under a '### ' heading."""
  tables = {}
  for part in text.split("\n### ")[1:]:
    heading, _, body = part.partition("\n")
    tables[heading] = {line.split(" | ")[0][2:]: line for line in body.splitlines()
                       if line.startswith("| ")}
  return tables


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_reference_lists_every_preset_modifier_and_field(reference, file):
  text = _section(reference, file)
  assert catalogue.markdown_cell(file.summary) in text
  tables = _tables(text)
  assert list(tables) == ["Presets", "Modifiers", "Fields", "The other presets"]
  presets = {k.removesuffix(" (default)"): row for k, row in tables["Presets"].items()}
  for name, line in file.presets.items():
    assert presets[f"`{name}`"].endswith(f" | {catalogue.markdown_cell(line)} |")
  for name, line in file.modifiers.items():
    assert tables["Modifiers"][f"`{name}`"].endswith(f" | {catalogue.markdown_cell(line)} |")
  default, fields, others = (_leaves(file.module.get_config(file.default)), tables["Fields"],
                             tables["The other presets"])
  for preset in file.presets:
    config = _leaves(file.module.get_config(preset))
    for path, value in config.items():
      if preset == file.default or default.get(path, object()) == value:
        assert fields[f"`{path}`"].split(" | ")[1] == f"`{value!r}`", path
      else:  # in the preset's row of the other presets
        assert f"`{path}`" in fields and f"`{path}={value!r}`" in others[f"`{preset}`"], (
            preset, path)
    for path in set(default) - set(config):
      assert f"`{path}` (absent)" in others[f"`{preset}`"]


def test_reference_tables_have_no_raw_pipe(reference):
  assert "m in \\|m - CE\\| of the barrier step" in reference
  header_cells = None
  for line in reference.splitlines():
    if not line.startswith("|"):
      header_cells = None
      continue
    cells = len(re.findall(r"(?<!\\)\|", line))
    header_cells = header_cells or cells
    assert cells == header_cells, line


def test_reference_renders_as_tables(reference):
  markdown = pytest.importorskip("markdown")
  html = markdown.markdown(reference, extensions=["tables"])
  assert html.count("<table>") == 4 * len(FILES)  # presets, modifiers, fields, other presets
  assert "<td>m in |m - CE| of the barrier step</td>" in html


def test_help_names_every_config_file_task_and_preset():
  text = catalogue.help_text()
  lines = text.splitlines()
  assert len(lines) < 45 and max(map(len, lines)) <= 96
  for preset in PAPER:
    assert re.search(rf"\b{preset}\b", text)
  for file in FILES:
    entry = text.split(f"  {file.name}.py (task {file.task}): ")[1]
    entry = " ".join(re.split(r"\n(?!      )", entry)[0].split())  # its wrapped lines
    for preset in file.presets:
      suffix = preset.rpartition("_")[2]
      assert (re.search(rf"(?<![\w.]){preset}\b", entry) or
              (preset in PAPER and "the paper presets" in entry) or
              (preset.rpartition("_")[0] in PAPER and f"_{suffix}" in entry
               and "each paper preset +" in entry)), (file.name, preset)
    assert entry.endswith("; modifiers: " + " ".join(file.modifiers))


def test_list_has_a_line_per_preset_and_modifier():
  lines = catalogue.list_text().splitlines()
  for file in FILES:
    for preset, line in file.presets.items():
      assert any(re.fullmatch(rf"  {file.name}\.py:{preset} +{re.escape(line)}", l)
                 for l in lines), preset
    for modifier, line in file.modifiers.items():
      assert any(l.startswith(f"  ,{modifier} ") and l.endswith(line) for l in lines)


def test_override_problem_names_the_closest_and_the_sections_fields():
  config = catalogue.config_file("train").module.get_config("cpu_cue")
  assert catalogue.override_problem(config, "optimizer.learning_rate") is None
  assert catalogue.override_problem(config, "data") is None
  problem = catalogue.override_problem(config, "optimizer.lr")
  assert problem.startswith("config.optimizer has no field 'lr'; closest: "
                            "optimizer.learning_rate, ")
  assert problem.endswith("fields of config.optimizer: decay_every_epochs, decay_factor, "
                          "learning_rate, momentum, name, schedule, warmup_steps, weight_decay")
  assert "closest: data.cue_proportion" in catalogue.override_problem(config, "cue_proportion")
  assert "closest: data.cue_proportion" in catalogue.override_problem(
      config, "data.cue_proportin")
  assert catalogue.override_problem(config, "seed.x") == (
      "config.seed is a value (0), not a section with a field 'x'")
  assert "\n" not in problem


def test_presets_hint_lists_the_presets_and_the_closest():
  hint = catalogue.presets_hint("experiments/configs/train.py", "cpu_cu,quicktest")
  assert hint.startswith("presets of train.py: cpu_cue cpu_nocue recall_lm")
  assert "the paper presets (--list shows every one); closest: cpu_cue" in hint
  assert hint.endswith("modifiers: quicktest")
  assert "closest" not in catalogue.presets_hint("experiments/configs/train.py", "cpu_cue,fast")
  assert "--list" in catalogue.presets_hint("my_config.py", "x")


def test_config_text_is_a_line_per_field():
  config = catalogue.config_file("quickstart").module.get_config("quicktest")
  lines = catalogue.config_text(config).splitlines()
  assert "path.num_t = 5" in lines and "task = 'quickstart'" in lines
  assert len(lines) == len(_leaves(config))
