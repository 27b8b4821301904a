"""pyproject's dependency floors and `.ci/oldest.txt`'s pins are the same versions.

`.ci/run` installs the first stage under `.ci/oldest.txt` (PIP_CONSTRAINT), so the suite
runs on the oldest versions pyproject admits; these tests keep the two files from
drifting apart: every dependency and every test-extra requirement is pinned at its floor.
"""

import pathlib
import tomllib

from packaging import requirements
from packaging import utils
from packaging import version

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(strings) -> dict[str, requirements.Requirement]:
  """Requirement strings by canonical name."""
  parsed = [requirements.Requirement(s) for s in strings]
  return {utils.canonicalize_name(r.name): r for r in parsed}


def _floor(req: requirements.Requirement) -> version.Version:
  """The one `>=` bound of a requirement."""
  floors = [s.version for s in req.specifier if s.operator == ">="]
  assert len(floors) == 1, f"{req}: expected exactly one '>=' floor, found {floors}"
  return version.Version(floors[0])


def _pins() -> dict[str, version.Version]:
  """`.ci/oldest.txt` as {canonical name: pinned version}; every line is `name==version`."""
  pins = {}
  for line in (REPO / ".ci" / "oldest.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = requirements.Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==" and not req.extras and req.marker is None, line
    name = utils.canonicalize_name(req.name)
    assert name not in pins, f"{name} pinned twice"
    pins[name] = version.Version(spec.version)
  return pins


def _pinned_requirements() -> dict[str, requirements.Requirement]:
  """What oldest.txt must pin: the dependencies and the test extra."""
  project = _pyproject()["project"]
  reqs = _requirements(project["dependencies"])
  for name, req in _requirements(project["optional-dependencies"]["test"]).items():
    assert name not in reqs or reqs[name].specifier == req.specifier, name
    reqs[name] = req
  return reqs


def test_every_dependency_is_pinned_at_its_floor():
  pins = _pins()
  for name, req in _pinned_requirements().items():
    assert name in pins, f"{req} is not pinned in .ci/oldest.txt"
    assert pins[name] == _floor(req), (
        f".ci/oldest.txt pins {name}=={pins[name]}, pyproject's floor is {req}")
    assert req.specifier.contains(pins[name]), f"{req} does not admit its own floor"


def test_oldest_pins_nothing_pyproject_does_not_name():
  pins = _pins()
  reqs = _pinned_requirements()
  extra = set(pins) - set(reqs)
  assert not extra, f".ci/oldest.txt pins packages pyproject does not name: {sorted(extra)}"


def test_every_extra_agrees_with_the_pinned_floors():
  """An extra naming a pinned package (tensorboardX in `tensorboard`) has the same floor."""
  pins = _pins()
  for extra, strings in _pyproject()["project"]["optional-dependencies"].items():
    for name, req in _requirements(strings).items():
      if name in pins:
        assert _floor(req) == pins[name], f"extra {extra!r}: {req} against {pins[name]}"
