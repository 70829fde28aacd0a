"""benchmarks/forgetting.py: its metrics and choices on synthetic runs, and one real (tiny) run on the bundled model."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "forgetting.py"


@pytest.fixture(scope="module")
def forgetting():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("forgetting_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(method, order="A", seed=0, lr=1e-4, accuracies=None, margins=None, general=None):
    """A job result as run_job writes it: `accuracies[t][i]` = accuracy on month i after month t."""
    months = ["safety", "capitals", "currency"] if order == "A" else ["currency", "capitals", "safety"]
    accuracies = accuracies or [[0.5, 0.0, 0.0], [0.5, 1.0, 0.0], [0.25, 1.0, 1.0]]
    margins = margins or [[2.0, 0.0, 0.0], [1.0, 4.0, 0.0], [0.5, 3.0, 6.0]]
    return {
        "job": {"phase": "test", "method": method, "order": order, "seed": seed, "lr": lr, "base_method": None},
        "months": months,
        "after": [
            {m: {"accuracy": accuracies[t][i], "mean_margin": margins[t][i]} for i, m in enumerate(months)}
            for t in range(3)
        ],
        "general": general or {"knowledge_qa": 0.2, "perplexity": 11.0, "kl_to_base": 0.1},
        "train_seconds": [1.0, 2.0, 3.0],
        "peak_memory_over_base_bytes": 2**20,
    }


def test_learning_and_backward_transfer_follow_the_retention_matrix(forgetting):
    metrics = forgetting.sequence_metrics(run("lora_all"))
    assert metrics["learning"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert metrics["bwt"] == pytest.approx(((0.25 - 0.5) + (1.0 - 1.0)) / 2)
    assert metrics["final_average"] == pytest.approx(0.75)
    margin = forgetting.sequence_metrics(run("lora_all"), "mean_margin")
    assert margin["bwt"] == pytest.approx(((0.5 - 2.0) + (3.0 - 4.0)) / 2)


def test_learning_rate_choice_uses_the_validation_score_and_ties_go_to_the_smaller_rate(forgetting):
    good = [[1.0, 0, 0], [1.0, 1.0, 0], [1.0, 1.0, 1.0]]
    bad = [[1.0, 0, 0], [0.0, 1.0, 0], [0.0, 0.0, 1.0]]
    grid = {
        "a": run("lora_mlp", lr=1e-5, accuracies=bad),
        "b": run("lora_mlp", lr=1e-4, accuracies=good),
        "c": run("lora_mlp", lr=1e-3, accuracies=good),
    }
    chosen = forgetting.select_learning_rates(grid, ["lora_mlp"])["lora_mlp"]
    assert chosen["lr"] == 1e-4
    assert chosen["grid"] == {"1e-05": pytest.approx(1 / 3), "0.0001": 1.0, "0.001": 1.0}


def test_the_bar_compares_each_of_ours_with_each_lora_row(forgetting):
    base = {"knowledge_qa": 0.3, "perplexity": 10.0, "kl_to_base": 0.0}
    lora = forgetting.aggregate([run("lora_all")], base)
    # Same learning, a quarter of the accuracy forgetting, a tenth of the knowledge loss and KL.
    ours_run = run(
        "selective_mlp_full",
        accuracies=[[0.5, 0.0, 0.0], [0.5, 1.0, 0.0], [0.4375, 1.0, 1.0]],
        general={"knowledge_qa": 0.29, "perplexity": 10.1, "kl_to_base": 0.01},
    )
    ours = forgetting.aggregate([ours_run], base)
    (verdict,) = forgetting.verdicts({"lora_all": lora, "selective_mlp_full": ours})
    assert verdict["learning_share"] == pytest.approx(1.0)
    assert verdict["forgetting_shares"]["forgetting"] == pytest.approx(0.25)
    assert verdict["forgetting_shares"]["knowledge_qa"] == pytest.approx(0.1)
    assert verdict["forgetting_shares"]["perplexity"] == pytest.approx(0.1)
    assert verdict["checks"]["learning"] and verdict["checks"]["knowledge_qa"]
    assert not verdict["checks"]["forgetting"]  # 0.25 > 0.20
    assert not verdict["meets_bar"]


def test_a_share_of_nothing_is_not_a_pass(forgetting):
    assert forgetting._share(0.0, 0.0) == 0.0
    assert forgetting._share(0.1, 0.0) is None
    assert forgetting._fmt_share(None).startswith("n/a")


def test_month_one_check_pairs_the_two_trainer_rows_per_run(forgetting):
    kept = run("continual", accuracies=[[0.8, 0, 0], [0.8, 1.0, 0], [0.8, 1.0, 1.0]])
    lost = run("continual_plain", accuracies=[[0.8, 0, 0], [0.6, 1.0, 0], [0.5, 1.0, 1.0]])
    (row,) = forgetting.month_one_check({"x": kept, "y": lost})
    assert row["month1"] == "safety"
    assert row["continual"]["after_month2"] == 0.8 and row["continual_plain"]["after_month2"] == 0.6
    assert row["higher_with_retention"]


def test_unknown_methods_and_orders_are_refused(forgetting, capsys):
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--methods", "lora_all,dora"])
    assert "dora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--orders", "C"])
    with pytest.raises(SystemExit):  # the trainer rows need one of ours to run inside the trainer
        forgetting.parse_args(["--methods", "lora_all,continual"])


@pytest.mark.slow
def test_a_tiny_run_chooses_rates_writes_every_row_and_resumes(forgetting, tmp_path):
    """The whole harness (grid, selection, both trainers, every suite) on a random 2-layer Llama with the bundled
    model's tokenizer: a minute on 2 cores. The real model's run is the committed one."""
    argv = [
        "--model",
        "tiny",
        "--methods",
        "lora_mlp,selective_mlp_lowrank,continual,continual_plain",
        "--orders",
        "A",
        "--seeds",
        "0",
        "--lrs",
        "1e-4,1e-3",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--n-train",
        "2",
        "--n-val",
        "2",
        "--n-test",
        "2",
        "--knowledge-questions",
        "2",
        "--refusal-prompts",
        "1",
        "--perplexity-tokens",
        "64",
        "--kl-general-anchors",
        "2",
        "--device",
        "cpu",
        "--work-dir",
        str(tmp_path / "work"),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert forgetting.main(argv) == 0
    report = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert set(report["rows"]) == {"lora_mlp", "selective_mlp_lowrank", "continual", "continual_plain"}
    assert report["continual_method"] == "selective_mlp_lowrank"
    for method in ("lora_mlp", "selective_mlp_lowrank"):  # chosen from the validation grid, one of its rates
        assert set(report["selection"][method]["grid"]) == {"0.0001", "0.001"}
        assert report["learning_rates"][method] == report["selection"][method]["lr"]
    assert report["learning_rates"]["continual"] == report["learning_rates"]["selective_mlp_lowrank"]
    assert len(report["month_one_check"]) == 1
    for row in report["rows"].values():
        assert 0.0 <= row["learning"]["mean"] <= 1.0
        assert math.isfinite(row["general_perplexity"]["mean"])
    assert (tmp_path / "out" / "forgetting.png").stat().st_size > 0
    assert "meets the bar" in (tmp_path / "out" / "forgetting.md").read_text()
    # Every job is saved: a second run reads them back instead of training again.
    saved = sorted(p.name for p in (tmp_path / "work" / "jobs").iterdir())
    assert len(saved) == 4 + 4  # 2 methods x 2 rates on validation, then 4 rows on test
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "work" / "jobs").iterdir()}
    assert forgetting.main([*argv, "--no-write"]) == 0
    assert {p: p.stat().st_mtime for p in (tmp_path / "work" / "jobs").iterdir()} == mtimes
