"""benchmarks/month_phases.py: its verdict and tables from a month's `timing_s`, and a smoke run on the tiny model
(the committed results are a run on the bundled model: benchmarks/results/month_phases.{md,json})."""

from __future__ import annotations

import json
import sys

import pytest
from testing_utils import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
from benchmarks import month_phases  # noqa: E402


TIMING = {
    "verify": 0.1,
    "data": 2.0,
    "load_model": 3.0,
    "baseline_evaluation": 200.0,
    "before_month": 20.0,
    "trainer": 60.0,
    "training": 300.0,
    "evaluation": 130.0,
    "finish": 40.0,
    "card": 5.0,
    "total": 765.0,
}


def test_verdict_is_the_month_s_evaluation_over_its_training():
    verdict = month_phases.verdict(TIMING)
    assert verdict["evaluation"] == 150.0 and verdict["training"] == 300.0  # before the month + after it
    assert verdict["ratio"] == pytest.approx(0.5) and verdict["met"]  # the bar itself is met
    assert verdict["ratio_with_baseline"] == pytest.approx(350 / 300) and verdict["baseline_evaluation"] == 200.0
    assert not month_phases.verdict({**TIMING, "evaluation": 130.1})["met"]
    later_month = {k: v for k, v in TIMING.items() if k != "baseline_evaluation"}  # month 0 ran in the first month
    assert month_phases.verdict(later_month)["ratio_with_baseline"] == pytest.approx(0.5)
    assert month_phases.verdict({**TIMING, "training": 0.0})["ratio"] is None
    assert not month_phases.verdict({**TIMING, "training": 0.0})["met"]
    with pytest.raises(ValueError, match="no timing_s"):
        month_phases.verdict({})


def test_tables_account_for_the_whole_month():
    rows = month_phases.phase_rows(TIMING)
    seconds = [float(row[1]) for row in rows]
    assert seconds[-1] == 765.0 and sum(seconds[:-1]) == pytest.approx(765.0, abs=0.1)  # phases + the rest = total
    assert rows[-2][0].startswith("not in a phase") and float(rows[-2][1]) == pytest.approx(4.9, abs=0.05)
    assert [row[2] for row in rows if "`training`" in row[0]] == ["39%"]
    suites = month_phases.suite_rows({"knowledge": 30.0, "perplexity": 10.0})
    assert suites == [["`knowledge`", "30.0", "75%"], ["`perplexity`", "10.0", "25%"]]


def test_the_md_says_when_other_processes_loaded_the_machine():
    assert month_phases.load_note((3.0, 3.1, 3.4), (2.0, 2.4, 2.9), 1).startswith("Other processes were loading")
    assert month_phases.load_note((1.2, 1.0, 1.0), (1.4, 1.1, 1.0), 1).startswith("No other process")
    assert month_phases.load_note(None, None, 1).startswith("No other process")


def test_arguments():
    args = month_phases.parse_args(["--threads", "0", "--steps", "3"])
    assert args.threads is None and args.steps == 3 and args.model == "embedded" and args.n_train == 48
    with pytest.raises(SystemExit):
        month_phases.parse_args(["--n-test", "0"])


@pytest.mark.slow  # one tiny month with the campaign's default evaluation (250 knowledge items): minutes on a shared CPU
def test_month_phases_smoke(tmp_path):
    assert month_phases.main(["--model", "tiny", "--steps", "1", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "month_phases.json").read_text())
    for key in ("benchmark", "command", "git_commit", "machine", "load_average_1_5_15", "settings", "verdict"):
        assert key in report
    timing, verdict = report["timing_s"], report["verdict"]
    assert report["settings"]["steps"] == 1 and report["settings"]["sizes"]["train_pairs"] == 48
    assert verdict == month_phases.verdict(timing)  # the verdict is the arithmetic above on the recorded phases
    assert {"training", "evaluation", "before_month", "baseline_evaluation"} <= set(timing)
    assert set(report["evaluation_suites_s"]) >= {"knowledge", "perplexity", "behaviour"}
    md = (tmp_path / "month_phases.md").read_text()
    assert "**Verdict**" in md and "Load average" in md and report["command"] in md
