"""The claims runner and report: verdicts from the stated criteria, not-run rows, C13 end to end."""

import copy
import dataclasses
import json

import pytest

from experiments import claims
from experiments import claims_measures as measures
from experiments import claims_report


def _eval_record(linear_clean, aligned_clean, clean_curve, cue_curve, broken=("cue",),
                 alignment=None):
  """An eval_path record with the given accuracy barriers (the fields the measures read)."""
  def path(clean=0.0, cue=0.0, broken_views=()):
    return {"barriers": {v: {"error": {"clean": clean, "cue": cue}.get(v, 0.0), "loss": 0.0}
                         for v in ("clean", "cue", "rand_cue", "rand_img")},
            "broken_views": list(broken_views)}
  return {"ts": [0, 0.5, 1], "eval": {"num_examples": 100},
          "alignment": alignment or {"method": "weight"},
          "batchnorm": {"num_examples": 64, "recomputed_at_every_t_from": "clean"},
          "paths": {"linear": path(clean=linear_clean, broken_views=("clean",)),
                    "linear (aligned)": path(clean=aligned_clean),
                    "bezier (fit on clean data)": path(clean=clean_curve, broken_views=broken),
                    "bezier (fit on box data, p=1.0)": path(cue=cue_curve,
                                                            broken_views=broken)}}


def test_verdicts_follow_the_stated_criteria():
  good = {"eval_path_weight_0": _eval_record(0.5, 0.2, 0.01, 0.02),
          "eval_path_activation_0": _eval_record(0.5, 0.3, 0.01, 0.02, alignment={
              "method": "activation", "activation_sites": "post_relu"}),
          # Reported, not judged: the official code matches post-ReLU outputs.
          "eval_path_activation_module_outputs_0": _eval_record(0.5, 0.01, 0.01, 0.02, alignment={
              "method": "activation", "activation_sites": "module_outputs"})}
  assert measures.c2(good, 1)["verdict"] == "reproduced"
  assert measures.c3(good, 1)["verdict"] == "reproduced"
  assert ("activation matching (post_relu): clean accuracy barrier 0.500 -> 0.300; activation "
          "matching (module_outputs): clean accuracy barrier 0.500 -> 0.010") in measures.c3(
              good, 1)["measured"]
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
  claims.main(["--command=run", "--claims=C13", f"--workdir={tmp_path / 'runs'}", f"--out={out}"])
  text = out.read_text()
  row = next(line for line in text.splitlines() if line.startswith("| C13 |"))
  assert "sign agreement" in row and "not run" not in row
  assert "**reproduced**" in row or "**partly**" in row or "**not reproduced**" in row
  assert "| C1 |" in text and "not run yet" in text  # C1's runs were not made
  # A second run reuses the finished record (same numbers, no retraining).
  claims.main(["--command=run", "--claims=C13", f"--workdir={tmp_path / 'runs'}", f"--out={out}"])
  assert out.read_text() == text


def _study(rows, cue_model=(0.7, 0.99, 0.45, 0.55), p=0.8, cue="box"):
  """A reproduce record: {method: (clean, cue, rand_cue, rand_img, barrier)}."""
  views = ("clean", "cue", "rand_cue", "rand_img")
  return {"cue_model": {"views": {v: {"accuracy": a} for v, a in zip(views, cue_model)}},
          "methods": {m: {"views": {v: {"mean": a, "std": 0.0, "values": [a, a]}
                                    for v, a in zip(views, row[:4])},
                          "loss_barrier_to_cue_model": {"mean": row[4], "std": 0.0,
                                                        "values": [row[4], row[4]]}}
                      for m, row in rows.items()},
          "seeds": [0, 1], "ts": [0, 0.5, 1],
          "data": {"cue": cue, "cue_proportion_of_cue_model": p, "num_clean": 2500,
                   "num_test_per_view": 2000, "path_batchnorm": "1024 cue training examples"}}


PATTERN = {"naive": (0.76, 0.97, 0.52, 0.46, 0.0), "lp": (0.80, 0.96, 0.59, 0.35, 0.0),
           "lp_ft": (0.85, 0.95, 0.74, 0.22, 0.0), "dfr": (0.80, 0.96, 0.57, 0.39, 0.0),
           "cbft": (0.76, 0.78, 0.74, 0.12, 0.15), "scratch": (0.40, 0.45, 0.38, 0.12, 2.0)}


def test_study_claims_read_the_reproduce_record():
  records = {"study": _study(PATTERN)}
  assert measures.c8(records, 1)["verdict"] == "reproduced"
  assert measures.c9(records, 1)["verdict"] == "reproduced"
  assert measures.c10(records, 1)["verdict"] == "reproduced"
  assert "scratch clean 0.400" in measures.c9(records, 1)["measured"]
  near_scratch = dict(PATTERN, scratch=(0.72, 0.7, 0.7, 0.1, 1.0))
  assert measures.c9({"study": _study(near_scratch)}, 1)["verdict"] == "partly"
  records.update({
      "study_naive_lr0.01": _study({"naive": (0.78, 0.96, 0.65, 0.31, 0.0)}),
      "study_naive_lr0.1": _study({"naive": (0.5, 0.6, 0.5, 0.2, 0.8)}),
      "study_p100_naive": _study({"naive": (0.6, 0.99, 0.3, 0.7, 0.0)},
                                 cue_model=(0.3, 1.0, 0.1, 0.9), p=1.0),
      "study_cbft_no_barrier": _study({"cbft": (0.75, 0.9, 0.6, 0.3, 0.0)}),
      "study_cbft_no_invariance": _study({"cbft": (0.75, 0.6, 0.7, 0.1, 0.3)})})
  assert measures.c6(records, 1)["verdict"] == "reproduced"
  assert measures.c7(records, 1)["verdict"] == "partly"  # lr 0.1 yes; p = 1: no barrier
  assert measures.c11(records, 1)["verdict"] == "reproduced"
  for name, p in (("study_p60", 0.6), ("study_p70", 0.7), ("study_p90", 0.9)):
    records[name] = _study(PATTERN, p=p)
  records["study_dominoes"] = _study(dict(PATTERN, cbft=(0.7, 0.9, 0.5, 0.4, 0.1)),
                                     cue="dominoes")
  result = measures.c12(records, 1)
  assert result["verdict"] == "partly"
  assert ("dominoes p=0.8: cue model clean 0.700, rand_img 0.550; naive clean 0.760, rand_img "
          "0.460; cbft clean 0.700, rand_img 0.400, clean - rand_cue 0.200") in result["measured"]


def test_endpoint_signatures_claim_reads_final_evals():
  views = ("clean", "cue", "rand_cue", "rand_img")
  final = lambda accs: {"views": {v: {"accuracy": a} for v, a in zip(views, accs)}}
  records = {"train_cue_0": final((0.68, 0.99, 0.43, 0.54)),
             "train_nocue_0": final((0.82, 0.815, 0.81, 0.10))}
  result = measures.c1(records, 1)
  assert result["verdict"] == "reproduced" and "rand_img 0.540" in result["measured"]
  records["train_nocue_0"] = final((0.82, 0.9, 0.81, 0.3))  # the no-cue model reads the cue
  assert measures.c1(records, 1)["verdict"] == "partly"


def _refused(argv, capsys, code=2) -> str:
  """The one-line error of `claims.main(argv)`, which must exit with `code`."""
  with pytest.raises(SystemExit) as exit_info:
    claims.main(argv)
  assert exit_info.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err  # one line
  return err[0]


def test_numeric_and_claim_arguments_are_one_line_errors(tmp_path, capsys):
  out = f"--out={tmp_path / 'claims.md'}"
  for pairs, message in (("0", "0 is not a positive integer"),
                         ("-2", "-2 is not a positive integer"), ("two", "invalid literal")):
    assert f"flag --pairs={pairs}: {message}" in _refused(
        ["--command=report", f"--pairs={pairs}", f"--workdir={tmp_path}", out], capsys)
  assert "unknown claims ['C99']; valid: ['C1'," in _refused(
      ["--command=run", "--claims=C99", out], capsys)
  assert "flag --command=rnu: value should be one of <run|report>" in _refused(
      ["--command=rnu", out], capsys)
  assert "--command is required: run" in _refused([out], capsys)
  assert "unexpected arguments ['run', 'C13']: the command and the claims are flags" in (
      _refused(["run", "C13", out], capsys))
  assert "Unknown command line flag 'workdri'" in _refused(["--command=run", "--workdri=x"],
                                                          capsys)
  assert not (tmp_path / "claims.md").exists()


def test_help_lists_the_commands_and_every_claim(capsys):
  claims.main(["--help"])
  text = capsys.readouterr().out
  assert "--command=run --claims=C13" in text and "--command=report" in text
  for claim in claims.CLAIMS:
    assert f"  {claim.id} " in text
  assert "--pairs" in text and "--overwrite" in text


def test_report_refuses_a_missing_or_empty_workdir(tmp_path, capsys):
  out = tmp_path / "claims.md"
  missing = _refused(["--command=report", f"--workdir={tmp_path / 'tpyo'}", f"--out={out}"],
                     capsys)
  assert f"--workdir {tmp_path / 'tpyo'} does not exist: no claims runs to report" in missing
  (tmp_path / "empty").mkdir()
  empty = _refused(["--command=report", f"--workdir={tmp_path / 'empty'}", f"--out={out}"],
                   capsys)
  assert f"--workdir {tmp_path / 'empty'} is empty" in empty
  assert not out.exists()


def _report_with_results(ids) -> str:
  """A report whose claims `ids` have results (the others not run)."""
  result = {"measured": "m", "verdict": "reproduced", "criteria": "c", "setup": "s"}
  fake = [dataclasses.replace(c, measure=lambda records, pairs: result) for c in claims.CLAIMS]
  return claims_report.render(fake, lambda c: {} if c.id in ids else None, 3)


def test_report_never_replaces_a_more_complete_report_unasked(tmp_path, capsys):
  runs, out = tmp_path / "runs", tmp_path / "claims.md"
  (runs / "theory").mkdir(parents=True)  # a claims run, unfinished: every claim is not run
  old = _report_with_results({"C2", "C13"})
  assert claims_report.claims_with_results(old) == ["C2", "C13"]
  out.write_text(old)
  argv = ["--command=report", f"--workdir={runs}", f"--out={out}"]
  assert ("was not replaced: it has results for ['C2', 'C13'] that the new report would lose"
          in _refused(argv, capsys))
  assert out.read_text() == old
  claims.main(argv + ["--overwrite"])
  assert claims_report.claims_with_results(out.read_text()) == []
  claims.main(argv)  # as complete as the report it replaces
  (runs / "eval_path_weight_0").mkdir()
  (runs / "eval_path_weight_0" / "eval_path.png").write_bytes(b"png")
  figures = claims_report.figure_files(claims.BY_ID["C2"], str(runs))
  assert figures == [(str(runs / "eval_path_weight_0" / "eval_path.png"),
                      "claims/eval_path_weight_0_eval_path.png")]
  claims_report.copy_figures(figures, str(tmp_path))
  assert (tmp_path / "claims" / "eval_path_weight_0_eval_path.png").read_bytes() == b"png"
  readme = tmp_path / "README.md"
  readme.write_text("# My notes\n")
  assert "it is not a claims report (its first line is '# My notes'" in _refused(
      ["--command=report", f"--workdir={runs}", f"--out={readme}"], capsys)
  assert readme.read_text() == "# My notes\n"


def test_run_refuses_another_tasks_workdir_or_a_foreign_directory(tmp_path, capsys):
  train = tmp_path / "train_run"
  train.mkdir()
  (train / "config.json").write_text(json.dumps({"task": "train", "seed": 0}))
  out = f"--out={tmp_path / 'claims.md'}"
  assert (f"--workdir {train} holds a mechconn run (task 'train', {train / 'config.json'}), "
          "not claims runs: the claims' runs would be nested inside it") in _refused(
              ["--command=run", "--claims=C13", f"--workdir={train}", out], capsys)
  assert sorted(p.name for p in train.iterdir()) == ["config.json"]
  mine = tmp_path / "mine"
  (mine / "notes").mkdir(parents=True)
  assert (f"--workdir {mine} is not a claims workdir: it holds ['notes'], not claims runs"
          in _refused(["--command=run", "--claims=C13", f"--workdir={mine}", out], capsys))
  assert sorted(p.name for p in mine.iterdir()) == ["notes"]
  # A claims workdir (any seed pair), a new one and an empty one are fine to run into.
  for name in ("train_cue_5", "eval_path_activation_module_outputs_2", "study_p60", "theory"):
    (tmp_path / "claims" / name).mkdir(parents=True)
  assert claims.workdir_problem(str(tmp_path / "claims"), "run") is None
  assert claims.workdir_problem(str(tmp_path / "new"), "run") is None
  (tmp_path / "empty").mkdir()
  assert claims.workdir_problem(str(tmp_path / "empty"), "run") is None
