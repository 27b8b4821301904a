"""The layout's rules, checked on the source: dependencies point down, modules stay small."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mechconn"
# Pure maths: no task, no checkpoints or workdirs, no progress bars, no launcher.
MATHS = ("paths", "batchnorm", "barriers", "evaluation", "align", "curves", "finetune",
         "counterfactual", "models", "data", "step", "finite", "types", "rngs", "flops",
         "matching", "symmetry", "axis_classes", "objectives", "path_core", "adapters",
         "nnx_adapter", "intercept", "repair", "input_checks", "axis_tracer", "trees",
         "diagnostics", "multi_align", "simplex", "simplex_checks")
FORBIDDEN_FOR_MATHS = ("mechconn.tasks", "mechconn.loop", "mechconn.checkpoint",
                       "mechconn.workdir", "mechconn.dry_run", "orbax", "tqdm", "experiments",
                       "ml_collections", "absl")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports (anywhere in it), as dotted names."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{alias.name}" for alias in node.names}
  return names


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _closure(module: str) -> set[str]:
  """The modules `module` imports, transitively through mechconn's own modules."""
  seen, todo = set(), [m for m in GRAPH if m == module or m.startswith(module + ".")]
  while todo:
    current = todo.pop()
    for name in GRAPH.get(current, ()):
      if name not in seen:
        seen.add(name)
        if name in GRAPH:
          todo.append(name)
  return seen


@pytest.mark.parametrize("module", MATHS)
def test_maths_modules_import_no_task_orbax_tqdm_or_launcher(module):
  imported = _closure(f"mechconn.{module}")
  bad = sorted(n for n in imported
               if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_FOR_MATHS))
  assert not bad, f"mechconn.{module} imports {bad}"


def test_the_library_never_imports_experiments():
  for module, names in GRAPH.items():
    assert not [n for n in names if n.split(".")[0] == "experiments"], module


def test_infrastructure_knows_no_task():
  for module in ("loop", "checkpoint", "workdir", "mesh", "dry_run", "report"):
    assert not [n for n in _closure(f"mechconn.{module}") if n.startswith("mechconn.tasks")]


def test_no_module_is_over_about_400_lines():
  sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
           for p in PACKAGE.rglob("*.py")}
  assert {f: n for f, n in sizes.items() if n > 410} == {}


def _functions():
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield str(path.relative_to(PACKAGE)), node


def test_no_function_is_over_60_lines():
  long = {f"{f}:{node.name}": node.end_lineno - node.lineno + 1 for f, node in _functions()
          if node.end_lineno - node.lineno + 1 > 60}
  assert long == {}


# What a task's config is made of: below `resolve`, tasks take typed specs of these.
SECTIONS = ("config", "data", "model", "opt", "optimizer", "path", "ft", "finetune", "cbft")


def test_no_config_section_reaches_the_tasks_untyped():
  untyped = [f"{f}:{node.name}({arg.arg})" for f, node in _functions() if f.startswith("tasks")
             for arg in node.args.args + node.args.kwonlyargs
             if arg.arg in SECTIONS and (arg.annotation is None or
                                         ast.unparse(arg.annotation) == "Any")]
  assert untyped == []
