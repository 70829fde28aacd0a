"""benchmarks/two_months.py: its pre-registered verdict on synthetic runs, and its argument checks.

The experiment itself trains the bundled model for most of an hour; its committed output is
benchmarks/results/two_months/continual_dpo_two_months.{md,json}. These tests pin down how that output is decided.
"""

import importlib
import subprocess
import sys

import pytest
from testing_utils import BENCHMARKS_DIR, REPO_ROOT


SCRIPT = BENCHMARKS_DIR / "two_months.py"


@pytest.fixture(scope="module")
def two_months():
    sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
    return importlib.import_module("benchmarks.two_months")


def run(seed, before, plain, kept, learned=1.0):
    """A seed's result as run_seed returns it: month-1 accuracy `before` month 2, then after it in each arm."""

    def arm(after):
        return {"R": {"m1": {"m1": before, "m2": 0.0}, "m2": {"m1": after, "m2": learned}}}

    return {"seed": seed, "arms": {"plain": arm(plain), "rehearsal+kl": arm(kept)}}


def test_verdict_is_the_mean_over_seeds_with_per_seed_counts(two_months):
    runs = [run(0, 1.0, 0.50, 0.90), run(1, 1.0, 0.80, 0.80), run(2, 1.0, 0.90, 0.70)]
    verdict = two_months.decide(runs, "m1", "m2")
    assert verdict["month1_acc_after_month2_plain"] == pytest.approx(0.7333, abs=1e-4)
    assert verdict["month1_acc_after_month2_rehearsal_kl"] == pytest.approx(0.8)
    assert (verdict["runs_higher"], verdict["runs_tied"], verdict["runs_lower"]) == (1, 1, 1)
    assert verdict["month2_caused_forgetting_without_retention"] and verdict["requirement_holds"]
    assert verdict["seeds"] == [0, 1, 2]


def test_verdict_does_not_hold_on_ties_or_without_both_arms(two_months):
    tied = two_months.decide([run(0, 1.0, 1.0, 1.0)], "m1", "m2")
    assert not tied["requirement_holds"] and not tied["month2_caused_forgetting_without_retention"]
    worse = two_months.decide([run(0, 1.0, 0.6, 0.5)], "m1", "m2")
    assert worse["month2_caused_forgetting_without_retention"] and not worse["requirement_holds"]
    one_arm = run(0, 1.0, 0.5, 0.9)
    del one_arm["arms"]["rehearsal+kl"]
    assert two_months.decide([one_arm], "m1", "m2") is None
    assert two_months.decide([], "m1", "m2") is None


@pytest.mark.parametrize("months", [["capitals", "capitals"], ["capitals", "weather"]])
def test_bad_months_are_refused_before_any_work(months, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--months", *months, "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--months needs two different months" in result.stderr
    assert not (tmp_path / "out").exists()
