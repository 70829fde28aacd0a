"""Smoke tests of `benchmarks/overhead.py` on the tiny random-init Llama: every requested row is measured and reported,
GeometryProjected is calibrated first, and the trainer penalties (anchor KL, EWC) run with finite losses. Timings of a
tiny model mean nothing; only the harness is checked."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from testing_utils import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT))  # the `benchmarks` package of this checkout
from benchmarks import overhead  # noqa: E402


TINY = ["--config", "tiny", "--batch-size", "1", "--seq-len", "32", "--rank", "4", "--warmup", "0", "--repeats", "2"]


def run_overhead(tmp_path: Path, *extra: str) -> dict:
    assert overhead.main([*TINY, "--skip-memory", "--output-dir", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / f"{extra[extra.index('--output-name') + 1]}.json").read_text())


def check_rows(report: dict, keys: list[str]) -> dict[str, dict]:
    rows = {row["key"]: row for row in report["results"]}
    assert sorted(rows) == sorted(keys)
    for row in rows.values():
        assert len(row["step_times_s"]) == 2
        assert row["step_time_median_s"] > 0 and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_time_median_s"])
        assert all(math.isfinite(loss) for loss in row["losses"])
        assert row["trainable_params"] > 0
    return rows


def test_overhead_rows_geometry_and_penalties(tmp_path):
    keys = ["lora_mlp", "selective_mlp_lowrank", "geometry", "penalty_kl", "penalty_all", "full_ft"]
    report = run_overhead(tmp_path, "--methods", ",".join(keys), "--output-name", "overhead_test")
    assert report["benchmark"] == "overhead" and report["output_name"] == "overhead_test"
    assert (tmp_path / "overhead_test.md").is_file() and not (tmp_path / "overhead.json").exists()
    rows = check_rows(report, keys)

    calibration = rows["geometry"]["calibration"]
    assert calibration["seconds"] > 0 and calibration["tokens"] >= calibration["tokens_required"]
    assert report["targets_match_lora"]["geometry"] is True
    assert rows["full_ft"]["trainable_params"] == report["model"]["parameters"]

    # the penalties: the KL is computed every step (zero at the start, policy = reference), EWC too
    for key in ("penalty_kl", "penalty_all"):
        assert len(rows[key]["kl_values"]) == 2 and all(math.isfinite(v) for v in rows[key]["kl_values"])
        assert rows[key]["kl_values"][0] == pytest.approx(0.0, abs=1e-5)
    assert len(rows["penalty_all"]["ewc_values"]) == 2 and "ewc_values" not in rows["penalty_kl"]
    assert rows["penalty_all"]["ewc_values"][0] == pytest.approx(0.0, abs=1e-8)
    assert rows["penalty_all"]["ewc_values"][1] > 0  # the first step moved the update
    assert set(report["penalty_verdict"]["rows"]) == {"penalty_kl", "penalty_all"}
    assert report["target"] is not None and report["failed"] == {} and report["skipped"] == {}
    assert report["settings"]["quantization"] == "none"


def test_overhead_4bit_sequential_reuses_saved_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    cache = tmp_path / "cache"
    args = ["--quantization", "4bit", "--sequential", "--gradient-checkpointing", "--model-cache-dir", str(cache)]
    args += ["--methods", "selective_mlp_lowrank,penalty_ewc,full_ft", "--output-name", "q"]
    report = run_overhead(tmp_path / "first", *args)
    check_rows(report, ["selective_mlp_lowrank", "penalty_ewc"])
    assert "full_ft" in report["skipped"]
    assert report["model"]["saved_base_reused"] is False
    assert report["settings"]["gradient_checkpointing"] is True and report["settings"]["sequential"] is True
    assert "bitsandbytes" in report["machine"]
    again = run_overhead(tmp_path / "second", *args)
    assert again["model"]["saved_base_reused"] is True


def test_overhead_reports_a_failed_calibration_and_runs_the_rest(tmp_path, monkeypatch):
    import peft_selective

    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(peft_selective, "calibrate", broken)
    report = run_overhead(tmp_path, "--methods", "lora_mlp,geometry", "--output-name", "f")
    check_rows(report, ["lora_mlp"])
    assert "same device" in report["failed"]["geometry"]
    assert "FAILED geometry" in (tmp_path / "f.md").read_text()
