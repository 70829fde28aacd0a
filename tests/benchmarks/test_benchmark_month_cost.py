"""Smoke test of `benchmarks/month_cost.py` on the tiny random-init Llama (2 steps, 1 round): both arms run a month in
their own process, the JSON has the fields the report is made of, and every ratio is computed from the measured values.
Timings of a tiny model mean nothing; only the harness is checked."""

from __future__ import annotations

import json
import sys

import pytest
from testing_utils import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
from benchmarks import month_cost  # noqa: E402


@pytest.mark.slow  # two fresh worker processes, each training two tiny months: about a minute on a shared CPU
def test_month_cost_smoke(tmp_path):
    assert month_cost.main(["--model", "tiny", "--steps", "2", "--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "month_cost.json").read_text())
    assert (tmp_path / "month_cost.md").is_file()
    for key in ("benchmark", "command", "git_commit", "machine", "load_average_1_5_15", "settings", "verdict"):
        assert key in report
    assert report["benchmark"] == "month_cost"
    assert report["settings"]["recipe"] == month_cost.RECOMMENDED and report["settings"]["recipe_is_recommended"]

    rows = {row["key"]: row for row in report["results"]}
    assert sorted(rows) == ["ours", "plain"]
    runs = report["runs"]
    for key, row in rows.items():
        (run,) = runs[key]
        assert run["global_steps"] == 2 and run["month_wall_s"] > 0 and run["month_cpu_s"] > 0
        assert run["peak_bytes"] > 0 and run["peak_over_model_bytes"] == run["peak_bytes"] - run["model_bytes"]
        assert row["month_wall_s_median"] == run["month_wall_s"]
        assert {"construct", "train"} <= set(run["phases"])
    ours, plain = runs["ours"][0], runs["plain"][0]
    # ours: the whole month, finish_month included, and the recommended terms really ran
    assert {"finish_month", "anchor_generation", "boundary_generation", "anchor_kl_forward"} <= set(ours["phases"])
    assert ours["month_wall_s"] >= sum(ours["phases"][p]["wall_s"] for p in ("construct", "train", "finish_month"))
    # (the random tiny model's boundary answers may all be empty and be skipped: the generation still ran, above)
    assert ours["rehearsal"]["new"] == 8 and ours["rehearsal"]["rehearsal:m1"] > 0
    assert set(ours["anchors"]) >= {"general", "earlier_months"} and ours["finish_month"]["rehearsal_rows"] > 0
    assert ours["train_rows"] >= 8 + ours["rehearsal"]["rehearsal:m1"] and plain["train_rows"] == 8

    # the ratios are the measured values divided, and the verdict applies the bars to them
    row = rows["ours"]
    assert row["wall_ratio_paired_median"] == pytest.approx(ours["month_wall_s"] / plain["month_wall_s"])
    assert row["cpu_ratio_paired_median"] == pytest.approx(ours["month_cpu_s"] / plain["month_cpu_s"])
    mem = ours["peak_over_model_bytes"] / plain["peak_over_model_bytes"]
    assert row["mem_ratio_paired_median"] == pytest.approx(mem)
    verdict = report["verdict"]
    assert verdict["wall_ratio"] == row["wall_ratio_paired_median"] and verdict["memory_ratio"] == pytest.approx(mem)
    assert verdict["time_met"] == (verdict["wall_ratio"] <= 1.5 and verdict["cpu_ratio"] <= 1.5)
    assert verdict["memory_met"] == (mem <= 1.2) and verdict["met"] == (verdict["time_met"] and verdict["memory_met"])


def test_recipe_override_and_terms_arms():
    recipe = month_cost.parse_recipe('{"kl_coef": 0.05, "boundary_pairs": 0}')
    assert recipe["kl_coef"] == 0.05 and recipe["rehearsal_ratio"] == month_cost.RECOMMENDED["rehearsal_ratio"]
    arms = month_cost.arm_recipes(recipe, with_terms=True)
    assert sorted(arms) == ["only_kl", "only_rehearsal", "only_sft", "ours", "ours_none"]
    kinds = ["general", "same_shape", "earlier_months"]
    assert arms["only_kl"] == {"kl_coef": 0.05, "kl_every": 2, "kl_anchor_kinds": kinds}
    assert arms["ours_none"] == {} and month_cost.needs_buffer(arms["only_kl"]) and not month_cost.needs_buffer({})
    with pytest.raises(ValueError, match="learning_rate"):
        month_cost.parse_recipe('{"learning_rate": 1.0}')
