"""mkdocs hooks: the pages generated from the code, so that they cannot drift from it.

- `configs.md`: every config file, preset and field (`experiments.catalogue`).
- `api/<module>.md`: one mkdocstrings page per public module of `mechconn`, listed under
  "API reference" in the navigation, grouped by package.
- `index.md`: the README, its links into docs/ made relative to the site.
- `changelog.md`: the repository's CHANGELOG.md.
"""

import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mechconn"


def public_modules() -> list[str]:
  """Every module of mechconn without a leading underscore in its name: the package, then
  its modules, then each subpackage and its modules (found on disk; nothing is imported)."""
  names = []
  for directory, dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    package = os.path.relpath(directory, ROOT).replace(os.sep, ".")
    if "__init__.py" not in files:
      continue
    names.append(package)
    names += [f"{package}.{f[:-3]}" for f in sorted(files)
              if f.endswith(".py") and not f.startswith("_")]
  return sorted(names, key=lambda n: (_group(n) != PACKAGE, _group(n), n != _group(n), n))


def _group(module: str) -> str:
  """The package a module is listed under: mechconn, or its subpackage."""
  parts = module.split(".")
  subpackage = os.path.join(ROOT, *parts[:2], "__init__.py")
  return ".".join(parts[:2]) if len(parts) >= 2 and os.path.exists(subpackage) else PACKAGE


def _api_page(module: str) -> str:
  return f"# `{module}`\n\n::: {module}\n"


def site_readme(text: str) -> str:
  """The README as the site's home page: links into docs/ and to the changelog rewritten."""
  return text.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")


def on_config(config):
  """Appends the API reference (one page per public module) to the navigation."""
  groups: dict[str, list] = {}
  for module in public_modules():
    groups.setdefault(_group(module), []).append({module: f"api/{module}.md"})
  config["nav"].append({"API reference": [{group: pages} for group, pages in groups.items()]})
  return config


def on_files(files, config):
  """Adds the generated pages."""
  from mkdocs.structure.files import File  # pylint: disable=import-outside-toplevel  # mkdocs only
  sys.path.insert(0, ROOT)
  from experiments import catalogue  # pylint: disable=import-outside-toplevel
  files.append(File.generated(config, "configs.md", content=catalogue.reference_markdown()))
  with open(os.path.join(ROOT, "README.md")) as f:
    files.append(File.generated(config, "index.md", content=site_readme(f.read())))
  with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
    files.append(File.generated(config, "changelog.md", content=f.read()))
  for module in public_modules():
    files.append(File.generated(config, f"api/{module}.md", content=_api_page(module)))
  return files
