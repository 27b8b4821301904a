"""The front door: the README fits a screen's worth of reading, and the docs site lists every page.

The site itself is built with `mkdocs build --strict` by `.ci/run` (a broken link, a missing
page or a docstring mkdocstrings cannot read fails CI); these tests check, without mkdocs,
what a build would not: that nothing written is left out of the navigation.
"""

import importlib.util
import os
import re

import yaml

README_MAX_LINES = 200


def _hooks(repo):
  spec = importlib.util.spec_from_file_location("docs_hooks", repo / "docs" / "hooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _nav_pages(nav) -> list[str]:
  if isinstance(nav, str):
    return [nav]
  if isinstance(nav, list):
    return [p for item in nav for p in _nav_pages(item)]
  return [p for value in nav.values() for p in _nav_pages(value)]


def test_readme_fits_the_front_door(repo):
  text = (repo / "README.md").read_text()
  assert len(text.splitlines()) <= README_MAX_LINES
  # The two commands, the quickstart and the library snippet are all there.
  assert "experiments/configs/reproduce.py:cpu" in text and "python -m pytest -q" in text
  assert "experiments/configs/quickstart.py" in text and "## The library" in text
  # Every docs page it links to exists.
  for target in re.findall(r"\]\((docs/[^)#]+)", text):
    assert (repo / target).exists(), target


def test_every_docs_page_is_in_the_navigation(repo):
  config = yaml.safe_load((repo / "mkdocs.yml").read_text())
  pages = set(_nav_pages(config["nav"]))
  generated = {"index.md", "configs.md", "changelog.md"}  # docs/hooks.py writes these
  written = {f for f in os.listdir(repo / "docs") if f.endswith(".md")}
  assert written - pages == set(), "pages missing from mkdocs.yml's nav"
  assert pages - written - generated == set(), "nav entries without a page"


def test_the_api_reference_covers_every_public_module(repo):
  modules = set(_hooks(repo).public_modules())
  on_disk = set()
  for directory, _, files in os.walk(repo / "mechconn"):
    package = os.path.relpath(directory, repo).replace(os.sep, ".")
    if "__pycache__" in package:
      continue
    on_disk |= {f"{package}.{f[:-3]}" if f != "__init__.py" else package
                for f in files if f.endswith(".py") and (f == "__init__.py" or f[0] != "_")}
  assert modules == on_disk
  assert {"mechconn.paths", "mechconn.tasks.specs", "mechconn.data.views"} <= modules


def test_the_home_page_is_the_readme_with_site_links(repo):
  hooks = _hooks(repo)
  page = hooks.site_readme((repo / "README.md").read_text())
  assert "](docs/" not in page and "](CHANGELOG.md)" not in page
  assert "](concepts.md)" in page and "](changelog.md)" in page
