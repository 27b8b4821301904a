"""The claims runner and report: verdicts from the stated criteria, not-run rows, C13 end to end."""

import copy

import pytest

from experiments import claims
from experiments import claims_measures as measures
from experiments import claims_report


def _eval_record(linear_clean, aligned_clean, clean_curve, cue_curve, broken=("cue",)):
  """An eval_path record with the given accuracy barriers (the fields the measures read)."""
  def path(clean=0.0, cue=0.0, broken_views=()):
    return {"barriers": {v: {"error": {"clean": clean, "cue": cue}.get(v, 0.0), "loss": 0.0}
                         for v in ("clean", "cue", "rand_cue", "rand_img")},
            "broken_views": list(broken_views)}
  return {"ts": [0, 0.5, 1], "eval": {"num_examples": 100},
          "batchnorm": {"num_examples": 64, "recomputed_at_every_t_from": "clean"},
          "paths": {"linear": path(clean=linear_clean, broken_views=("clean",)),
                    "linear (aligned)": path(clean=aligned_clean),
                    "bezier (fit on clean data)": path(clean=clean_curve, broken_views=broken),
                    "bezier (fit on box data, p=1.0)": path(cue=cue_curve,
                                                            broken_views=broken)}}


def test_verdicts_follow_the_stated_criteria():
  good = {"eval_path_weight_0": _eval_record(0.5, 0.2, 0.01, 0.02),
          "eval_path_activation_0": _eval_record(0.5, 0.3, 0.01, 0.02)}
  assert measures.c2(good, 1)["verdict"] == "reproduced"
  assert measures.c3(good, 1)["verdict"] == "reproduced"
  assert measures.c4(good, 1)["verdict"] == "reproduced"
  assert measures.c5(good, 1)["verdict"] == "reproduced"
  bad = copy.deepcopy(good)
  bad["eval_path_activation_0"] = _eval_record(0.5, 0.01, 0.01, 0.02)  # activation removes it
  assert measures.c3(bad, 1)["verdict"] == "partly"
  flat = {"eval_path_weight_0": _eval_record(0.01, 0.0, 0.2, 0.3, broken=())}
  assert measures.c2(flat, 1)["verdict"] == "not reproduced"
  assert measures.c4(flat, 1)["verdict"] == "not reproduced"
  assert measures.c5(flat, 1)["verdict"] == "not reproduced"
  assert "0.500" in measures.c2(good, 1)["measured"]


def test_report_marks_claims_without_runs_as_not_run():
  text = claims_report.render(claims.CLAIMS, lambda claim: None, 3)
  assert text.count("**not run**") == len(claims.CLAIMS)
  assert "| C11 |" in text and "not run yet (a run is missing or of another recipe)" in text


@pytest.mark.slow
def test_c13_runs_and_reports_end_to_end(tmp_path):
  out = tmp_path / "claims.md"
  claims.main(["run", "C13", f"--workdir={tmp_path / 'runs'}", f"--out={out}"])
  text = out.read_text()
  row = next(line for line in text.splitlines() if line.startswith("| C13 |"))
  assert "sign agreement" in row and "not run" not in row
  assert "**reproduced**" in row or "**partly**" in row or "**not reproduced**" in row
  assert "| C1 |" in text and "not run yet" in text  # C1's runs were not made
  # A second run reuses the finished record (same numbers, no retraining).
  claims.main(["run", "C13", f"--workdir={tmp_path / 'runs'}", f"--out={out}"])
  assert out.read_text() == text
