"""Every config file, preset, modifier and field, read from the config files themselves.

One source for what `python -m experiments.main` prints (`--help`, `--list`,
`--print_config`, the closest fields of a misspelt override) and for the docs'
config reference (`reference_markdown`, rendered by docs/hooks.py).

- A config file (`experiments/configs/NAME.py`): its task, its summary (its
  docstring's first line), `presets()` (name -> one line; the first is the
  default) and `MODIFIERS` (name -> one line).
- A field: a leaf of a preset's config, by dotted path, with its value and the
  comment of the assignment that sets it (at the end of the line, or the comment
  lines just above; `ast` and `tokenize`). The files assign through local names
  (`ft.cbft.margin`, `config.num_epochs`), so a path (`finetune.cbft.margin`)
  takes the assignment matching its longest dotted suffix. `config.` is the
  root in the defining file, and a nested section in a config file it imports
  (reproduce's `train` is train.py's config). Ties go to a builder whose fields
  the config all has, then to one that builds rather than changes a recipe (not
  apply_*, shrink_*, quick*), to the defining file, the files it imports,
  common.py, then to the section sharing the most fields. A field no comment
  describes (a model attribute) takes its section's.
"""

import ast
import collections
import dataclasses
import difflib
import functools
import html
import importlib
import io
import os
import pathlib
import re
import textwrap
import tokenize
import types
from typing import Any

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
# Every config file, in the order a reader meets them (tests check that none is missing).
FILES = ("quickstart", "train", "fit_curve", "eval_path", "finetune", "reproduce", "theory",
         "merge")
_CHANGES_A_RECIPE = re.compile(r"apply|shrink|quick")  # function names: not where fields start
_PRAGMA = re.compile(r"(noqa|pylint|pytype|type:)")


@dataclasses.dataclass(frozen=True)
class ConfigFile:
  """A config file: its name ('train'), module, task, summary, presets and modifiers."""

  name: str
  module: types.ModuleType
  task: str
  summary: str
  presets: dict[str, str]  # name -> one line; the first is the default
  modifiers: dict[str, str]  # name -> one line

  @property
  def path(self) -> str:
    return f"experiments/configs/{self.name}.py"

  @property
  def default(self) -> str:
    return next(iter(self.presets))


@dataclasses.dataclass(frozen=True)
class Field:
  """A leaf of a preset's config: its dotted path, value and description."""

  path: str
  value: Any
  description: str


@functools.cache
def config_files() -> tuple[ConfigFile, ...]:
  """Every config file of `FILES`, loaded."""
  out = []
  for name in FILES:
    module = importlib.import_module(f"experiments.configs.{name}")
    out.append(ConfigFile(name, module, module.get_config().task,
                          module.__doc__.strip().splitlines()[0], module.presets(),
                          dict(module.MODIFIERS)))
  return tuple(out)


def config_file(name: str) -> ConfigFile:
  """The config file 'train', 'train.py' or 'experiments/configs/train.py'; KeyError if none."""
  stem = pathlib.Path(name).stem
  for file in config_files():
    if file.name == stem:
      return file
  raise KeyError(f"No config file {name!r}; config files: {[f.path for f in config_files()]}.")


def leaves(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{dotted path: value} of every leaf, sections in a ConfigDict's (sorted) order; an empty
  section is a leaf."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      out.update({f"{key}.{path}": leaf for path, leaf in leaves(value).items()})
    else:
      out[key] = value
  return out


@functools.cache
def fields(name: str, preset: str) -> list[Field]:
  """Every field of configs/`name`.py's `get_config(preset)`, its value and description."""
  config = config_file(name).module.get_config(preset)
  paths = leaves(config)
  known = _known(paths)
  return [Field(path, value, describe(name, config, path, known))
          for path, value in paths.items()]


def _known(paths) -> set[tuple[str, ...]]:
  """Every field path and every section path above one, as tuples."""
  return {tuple(p.split("."))[:i] for p in paths for i in range(1, p.count(".") + 2)}


# Descriptions: the comments of the assignments in the config files' source.


@dataclasses.dataclass(frozen=True)
class _Comment:
  """A commented assignment: its file, target (('ft', 'cbft', 'margin')), comment and context."""

  source: str
  chain: tuple[str, ...]
  text: str
  builds: bool  # in a function that builds a recipe (not apply_*, shrink_*, quick*)
  siblings: frozenset[str]  # the fields its function assigns beside it, in the same section
  # What its function builds through the same local name: the attributes after it, of every
  # assignment in the function's body (not nested: an `if` block changes a recipe).
  family: frozenset[tuple[str, ...]]
  line: int


def _comment_lines(source: str) -> tuple[dict[int, str], dict[int, str]]:
  """({line: comment after code}, {line: comment alone on its line})."""
  trailing, alone = {}, {}
  lines = source.splitlines()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row, column = token.start
      text = token.string.lstrip("#").strip()
      (trailing if lines[row - 1][:column].strip() else alone)[row] = text
  return trailing, alone


def _chain(node: ast.expr) -> tuple[str, ...] | None:
  """`a.b.c` -> ('a', 'b', 'c'); None for anything but a name's attributes."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return (node.id, *parts) if parts and isinstance(node, ast.Name) else None


def _targets(statement: ast.Assign) -> list[tuple[str, ...]]:
  nodes = [n for t in statement.targets for n in (t.elts if isinstance(t, ast.Tuple) else [t])]
  return [chain for chain in map(_chain, nodes) if chain]


def _comment_of(statement: ast.stmt, trailing: dict, alone: dict) -> str:
  """The comment at the end of one of the statement's lines, or the comment lines above it."""
  for row in range(statement.lineno, statement.end_lineno + 1):
    if row in trailing and not _PRAGMA.match(trailing[row]):
      return trailing[row]
  row, above = statement.lineno - 1, []
  while row in alone:
    above.insert(0, alone[row])
    row -= 1
  return " ".join(above)


@functools.cache
def _comments(source: str) -> dict[str, list[_Comment]]:
  """The commented assignments inside the functions of configs/`source`.py, by field name."""
  text = (CONFIG_DIR / f"{source}.py").read_text()
  trailing, alone = _comment_lines(text)
  out = collections.defaultdict(list)
  for function in ast.walk(ast.parse(text)):
    if not isinstance(function, ast.FunctionDef):
      continue
    assigns = [(s, _targets(s)) for s in ast.walk(function) if isinstance(s, ast.Assign)]
    siblings, family = collections.defaultdict(set), collections.defaultdict(set)
    for statement, chains in assigns:
      for chain in chains:
        siblings[chain[:-1]].add(chain[-1])
        if statement in function.body:
          family[chain[0]].add(chain[1:])
    for statement, chains in assigns:
      comment = _comment_of(statement, trailing, alone)
      for chain in chains if comment else ():
        out[chain[-1]].append(_Comment(
            source, chain, comment, not _CHANGES_A_RECIPE.search(function.name),
            frozenset(siblings[chain[:-1]]), frozenset(family[chain[0]]), statement.lineno))
  return out


@functools.cache
def _imported(name: str) -> tuple[str, ...]:
  """The config files configs/`name`.py imports, transitively, nearest first."""
  tree = ast.parse((CONFIG_DIR / f"{name}.py").read_text())
  direct = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "experiments.configs" for alias in node.names
            if alias.name != "common"]
  out = list(direct)
  for module in direct:
    out += [m for m in _imported(module) if m not in out]
  return tuple(out)


def _matched(comment: _Comment, parts: tuple[str, ...], own: bool) -> int:
  """How many trailing components of the field path `parts` the assignment names; 0: none."""
  root, attributes = comment.chain[0], comment.chain[1:]
  if root == "config" and comment.source != "common":
    if own:  # the defining file's own config: its root
      return len(parts) if attributes == parts else 0
    size = len(attributes)  # an imported file's config: nested here
    return size if len(parts) > size and parts[-size:] == attributes else 0
  return len(os.path.commonprefix([parts[::-1], comment.chain[::-1]]))  # per component


def _fits(comment: _Comment, parts: tuple[str, ...], known: set) -> bool:
  """Whether every field the assignment's function builds beside it is in the config (else it
  builds another preset's section: the language model's data, say)."""
  root = len(parts) - len(comment.chain) + 1  # where its local name sits in the path
  return root >= 0 and all(parts[:root] + path in known for path in comment.family)


def describe(name: str, config: ml_collections.ConfigDict, path: str,
             known: set | None = None) -> str:
  """The description of field `path` of `config`, a preset of configs/`name`.py ('' if none).

  `known`: every path of `config` and its sections, as tuples (made if None).
  """
  known = _known(leaves(config)) if known is None else known
  parts = tuple(path.split("."))
  keys = {p[-1] for p in known if p[:-1] == parts[:-1]}
  best, best_key = "", None
  for rank, source in enumerate((name, *_imported(name), "common")):
    for comment in _comments(source).get(parts[-1], ()):
      size = _matched(comment, parts, own=source == name)
      overlap = len(keys & comment.siblings) / len(keys | comment.siblings)
      key = (size, _fits(comment, parts, known), comment.builds, -rank, overlap, -comment.line)
      if size and (best_key is None or key > best_key):
        best, best_key = comment.text, key
  if not best and len(parts) > 1:
    parent = ".".join(parts[:-1])
    return f"an entry of {parent}: {describe(name, config, parent, known)}"
  return best


# What the launcher prints.


def compact_presets(names: list[str]) -> str:
  """Preset names, with train.py's paper presets (or each of them + a suffix) as one phrase."""
  paper, rest, phrases = config_file("train").module.paper_presets(), list(names), []
  if set(paper) <= set(rest):
    rest = [n for n in rest if n not in paper]
    phrases.append("the paper presets")
  suffixes = dict.fromkeys(n[len(p) + 1:] for n in rest for p in paper if n.startswith(p + "_"))
  if suffixes and all(f"{p}_{s}" in rest for p in paper for s in suffixes):
    rest = [n for n in rest if not any(n == f"{p}_{s}" for p in paper for s in suffixes)]
    phrases.append("each paper preset + " + " or ".join(f"_{s}" for s in suffixes))
  return " ".join(rest) + "".join(f", {p}" for p in phrases)


def help_text(width: int = 96) -> str:
  """The config files, their tasks and every preset's name, for `--help`."""
  lines = textwrap.wrap("Config files and their tasks, presets and modifiers "
                        "(--config=experiments/configs/FILE:PRESET[,MODIFIER...]; the first "
                        "preset is the default; --list: a line on each):", width)
  for file in config_files():
    text = (f"{file.name}.py (task {file.task}): {compact_presets(list(file.presets))}; "
            f"modifiers: {' '.join(file.modifiers)}")
    lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
  lines.append("The paper presets, DATASET_CUE{PERCENT}_MODEL (CIFAR via TFDS):")
  lines += textwrap.wrap(" ".join(config_file("train").module.paper_presets()), width,
                         initial_indent="  ", subsequent_indent="  ")
  return "\n" + "\n".join(lines).replace("%", "%%") + "\n"  # absl formats it with %


def list_text() -> str:
  """Every preset and modifier of every config file with its line, for `--list`."""
  lines = []
  for file in config_files():
    lines.append(f"{file.path} (task {file.task}): {file.summary}")
    names = [f"{file.name}.py:{p}" for p in file.presets] + [f",{m}" for m in file.modifiers]
    width = max(map(len, names))
    lines += [f"  {n:<{width}}  {d}" for n, d in zip(names, [*file.presets.values(),
                                                                *file.modifiers.values()])]
  return "\n".join(lines)


def config_text(config: ml_collections.ConfigDict) -> str:
  """`path = value`, a line per field: the config as `--print_config` shows it."""
  return "\n".join(f"{path} = {value!r}" for path, value in leaves(config).items())


def override_problem(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why `--config.<path>` names no field of `config` (the closest fields, the section's
  fields); None if it names one."""
  node, walked = config, []
  for part in path.split("."):
    section = ".".join(["config", *walked])
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{section} is a value ({node!r}), not a section with a field {part!r}"
    if part not in node.keys():
      paths, prefix = list(leaves(config)), "".join(f"{w}." for w in walked)
      closest = [p for p in paths if p.rpartition(".")[2] == part]  # in another section
      closest += [prefix + k for k in node.keys()  # initials: 'lr' for learning_rate
                  if "".join(w[:1] for w in k.split("_")) == part]
      closest += difflib.get_close_matches(path, paths, n=3) + [
          prefix + k for k in difflib.get_close_matches(part, node.keys(), n=3)]
      return (f"{section} has no field {part!r}; closest: "
              f"{', '.join(list(dict.fromkeys(closest))[:4]) or 'none'}; fields of {section}: "
              f"{', '.join(node.keys())}")
    node = node[part]
    walked.append(part)
  return None


def presets_hint(path: str, preset: str) -> str:
  """The presets and modifiers of the config file at `path`, and the closest to `preset`."""
  try:
    file = config_file(path)
  except KeyError:
    return "(--list shows every preset of every config file)"
  name = preset.split(",")[0]
  closest = [] if name in file.presets else difflib.get_close_matches(name, list(file.presets))
  return (f"presets of {file.name}.py: {compact_presets(list(file.presets))} (--list shows "
          f"every one){'; closest: ' if closest else ''}{', '.join(closest)}; modifiers: "
          f"{', '.join(file.modifiers)}")


# The docs' config reference.


def markdown_cell(text: str) -> str:
  """`text` safe in a Markdown table cell: no raw |, <, >, & or *."""
  return html.escape(" ".join(text.split()), quote=False).replace("|", r"\|").replace("*", r"\*")


def markdown_code(text: str) -> str:
  """`text` as inline code in a table cell (plain, escaped, where it holds | or a backtick)."""
  return markdown_cell(text) if "|" in text or "`" in text else f"`{text}`"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
  return ([f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
          + [f"| {' | '.join(row)} |" for row in rows] + [""])


def _differences(file: ConfigFile, preset: str) -> str:
  default = {f.path: f.value for f in fields(file.name, file.default)}
  mine = {f.path: f.value for f in fields(file.name, preset)}
  changed = [markdown_code(f"{p}={v!r}") for p, v in mine.items()
             if p not in default or default[p] != v]
  changed += [f"{markdown_code(p)} (absent)" for p in default if p not in mine]
  return ", ".join(changed) or "none"


def _file_markdown(file: ConfigFile) -> list[str]:
  """A config file's section of the reference."""
  out = [f"## `{file.name}.py`", "", f"{markdown_cell(file.summary)} Task `{file.task}`:", "",
         f"    python -m experiments.main --config={file.path}:PRESET[,MODIFIER...] "
         "--workdir=DIR", "", "### Presets", ""]
  out += _table(("preset", "what it runs"), [
      (markdown_code(p) + (" (default)" if p == file.default else ""), markdown_cell(d))
      for p, d in file.presets.items()])
  out += ["### Modifiers", "", "After the preset and a comma (`PRESET,MODIFIER`).", ""]
  out += _table(("modifier", "what it does"),
                [(markdown_code(m), markdown_cell(d)) for m, d in file.modifiers.items()])
  described = {}  # every field of every preset: the default's first
  for preset in file.presets:
    for field in fields(file.name, preset):
      described.setdefault(field.path, (preset, field))
  out += ["### Fields", "", f"Every field, with its value in the default preset `{file.default}` "
          "(override one with `--config.FIELD=VALUE`):", ""]
  out += _table(("field", f"`{file.default}`", "description"), [
      (markdown_code(path), markdown_code(repr(field.value)) if preset == file.default
       else f"(absent; {markdown_code(preset)}: {markdown_code(repr(field.value))})",
       markdown_cell(field.description)) for path, (preset, field) in sorted(described.items())])
  out += ["### The other presets", "", f"Each preset's fields that differ from `{file.default}`:",
          ""]
  out += _table(("preset", "fields that differ"), [
      (markdown_code(p), _differences(file, p)) for p in file.presets if p != file.default])
  return out


def reference_markdown() -> str:
  """The config reference (docs/configs.md): every config file, preset, modifier and field."""
  out = ["# Config reference", "",
         "Every config file in `experiments/configs`, its presets and modifiers, and every field "
         "with its default and description, generated from the config files "
         "(`experiments/catalogue.py`). On the command line: `python -m experiments.main "
         "--help` (names), `--list` (one line per preset), `--print_config` (a command's "
         "config).", ""]
  for file in config_files():
    out += _file_markdown(file)
  return "\n".join(out)
