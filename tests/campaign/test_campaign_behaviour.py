"""The campaign judges learning and forgetting by behaviour: greedy answers scored by the month's declared checks (or
agreement), with 95% intervals, a paired gain against the model before the month, bleed of a month's style on
off-scope answers, and a knowledge probe chosen after the data is known. Generation is monkeypatched (the tiny random
model cannot learn a style in 4 steps): the model "adopts" a style exactly when it holds the month's adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from testing_utils import CAMPAIGN_INIT, cli, write_month

from peft_selective.campaign.campaign import Campaign, CampaignConfig, format_report, normalize_checks
from peft_selective.evaluation import suites as evaluation_module
from peft_selective.evaluation.suites import (
    bleed_table,
    fit_style_signature,
    knowledge_table,
    learning_table,
    month_tests,
    retention_numbers,
)


SAYS_YES = [{"regex": "^yes$", "name": "says_yes"}]


@pytest.fixture(scope="module")
def months(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"m1": write_month(folder / "m1.jsonl", "yes", "no"), "m2": write_month(folder / "m2.jsonl", "good", "bad")}


def answer_yes_with(adapter: str):
    """Generation that answers "yes" to everything when the model holds `adapter`, else "maybe"."""

    def generate(model, tokenizer, prompts, **kwargs):
        style = "yes" if adapter in getattr(model, "peft_config", {}) else "maybe"
        return [style for _ in prompts]

    return generate


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def campaign_yes(tmp_path_factory, tiny_chat_base, months) -> Path:
    """m1 declares "says yes" and the model adopts it; m2 declares "good" and the model keeps saying "yes"."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(evaluation_module, "generate_answers", answer_yes_with("m1"))
    try:
        directory = tmp_path_factory.mktemp("campaign") / "c"
        assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
        checks = json.dumps(SAYS_YES)
        assert cli("run-month", "m1", "--campaign_dir", directory, "--data", months["m1"], "--checks", checks) == 0
        m2_checks = tmp_path_factory.mktemp("checks") / "m2.yaml"
        m2_checks.write_text("checks:\n  - regex: '^good'\n    name: says_good\nbleed_checks:\n  - regex: good\n")
        assert cli("run-month", "m2", "--campaign_dir", directory, "--data", months["m2"], "--checks", m2_checks) == 0
    finally:
        monkeypatch.undo()
    return directory


def test_a_month_that_adopts_its_declared_style_is_learned(campaign_yes):
    campaign = Campaign(campaign_yes)
    # the checks are stored with the month, and used
    assert campaign.month("m1")["checks"] == {"checks": SAYS_YES, "bleed_checks": []}
    assert campaign.month("m2")["checks"]["bleed_checks"] == [{"regex": "good"}]
    evaluations = campaign.evaluations
    cell = evaluations["m1"]["behaviour"]["m1"]
    assert cell["scored_by"] == "checks" and cell["scores"] == [1.0, 1.0, 1.0]
    assert cell["checks"] == {"says_yes": [1.0, 1.0, 1.0]} and cell["summary"]["score"] == {
        "mean": 1.0,
        "ci95": [1.0, 1.0],
    }
    before = campaign.report_inputs()["before"]
    assert before["m1"]["scores"] == [0.0, 0.0, 0.0]  # the base answered "maybe"
    learning = learning_table(evaluations, ["m1", "m2"], before)
    assert learning["m1"]["learned"] and learning["m1"]["gain"]["mean"] == 1.0
    # m2's style ("good") never shows: not learned, although its ranking / implicit reward may move
    assert not learning["m2"]["learned"] and learning["m2"]["gain"]["mean"] == 0.0
    assert "accuracy" not in evaluations["m2"]["preference"]["m2"]  # the implicit reward keeps its own name
    assert {"ranking_accuracy", "ranking_margin", "implicit_reward_accuracy"} <= set(
        evaluations["m2"]["preference"]["m2"]
    )
    # retention: m1's style is kept after m2; BWT 0 with a paired interval
    retention = campaign.retention()
    assert retention["R"] == [[1.0, None], [1.0, 0.0]] and retention["ci95"][1][0] == [1.0, 1.0]
    assert retention["bwt_interval"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 3}
    # bleed: "yes" everywhere off-scope after m1 (generic prompts, knowledge questions, m2's prompts); the base never
    bleed = bleed_table(evaluations, ["m1", "m2"])
    assert bleed["m1"]["styles"] == "checks" and bleed["m1"]["after"]["m2"]["mean"] == 1.0
    assert bleed["m1"]["base"]["mean"] == 0.0 and bleed["m2"]["styles"] == "bleed_checks"
    assert evaluations["m2"]["bleed"]["m1"]["counts"] == {"generic": 2, "knowledge": 3, "m2": 3}


def test_evaluations_json_keeps_per_item_scores_and_summaries(campaign_yes):
    stored = json.loads((campaign_yes / "evaluations.json").read_text())
    m2 = stored["m2"]
    assert len(m2["behaviour"]["m1"]["scores"]) == 3 and len(m2["behaviour"]["m1"]["agreement"]) == 3
    assert (
        len(m2["preference"]["m1"]["items"]["ranking"]) == 3 and "implicit_reward" in m2["preference"]["m1"]["items"]
    )
    assert len(m2["knowledge"]["mc"]) == 3 and m2["knowledge"]["exact"]["items"] == [0, 1, 2]
    assert set(m2["knowledge"]["summary"]["mc"]) == {"mean", "ci95", "n"}
    assert len(m2["behaviour"]["m2"]["examples"]) == 3  # a few generations as examples, no more
    assert "offscope_generations" in stored["month-0"] and "offscope_generations" not in m2
    # the recomputed numbers equal the stored summaries
    assert m2["behaviour"]["m2"]["summary"]["score"] == {"mean": 0.0, "ci95": [0.0, 0.0]}


def test_report_and_card_show_intervals(campaign_yes):
    campaign = Campaign(campaign_yes)
    report = campaign.report()
    assert "| after \\ on | m1 | m2 |" in report
    assert "| m2 | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] |" in report
    assert (
        "| m1 | checks: says_yes | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] | +1.000 [+1.000, +1.000] | yes |"
        in (report)
    )
    assert "| m2 | checks: says_good |" in report and report.count("| no |") == 1
    assert "backward transfer +0.000 [+0.000, +0.000] (paired, same items)" in report
    assert "| multiple choice (n=3) |" in report and "implicit-reward accuracy" in report
    assert "Only 3 knowledge items survive (fewer than 150)" in report
    card = (campaign_yes / "cards" / "m2" / "README.md").read_text()
    assert "| m2 | 1.000 [1.000, 1.000] | **0.000** [0.000, 0.000] |" in card
    assert (
        "| m1 | checks: says_yes | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] | +1.000 [+1.000, +1.000] | **yes** |"
        in (card)
    )
    assert "## Bleed" in card and "## Knowledge" in card and "## Ranking of the held-out pairs" in card
    assert "Behavioural (generation-based) numbers" in card and "is what each month learned" not in card
    assert "(paired interval, same items)" in card


def test_a_bad_check_is_refused_before_the_month_is_registered(campaign_yes, months, tmp_path, capsys):
    import shutil

    directory = tmp_path / "c"
    shutil.copytree(campaign_yes, directory)
    before = snapshot(directory)
    bad = json.dumps([{"regex": "(unclosed", "name": "broken"}])
    assert cli("run-month", "m3", "--campaign_dir", directory, "--data", months["m1"], "--checks", bad) == 2
    message = capsys.readouterr().err
    assert "Month 'm3' was not registered" in message and "(unclosed" in message
    assert snapshot(directory) == before
    with pytest.raises(ValueError, match="Unknown key"):
        normalize_checks([{"regexp": "x"}])


def test_overlapping_knowledge_items_of_the_user_are_refused(tiny_chat_base, months, tmp_path, capsys):
    items = tmp_path / "knowledge.jsonl"
    rows = [
        {"question": "what is the capital of france", "answer": "paris", "distractors": ["berlin"]},
        {"question": "which number is seven", "answer": "seven", "distractors": ["six"], "entity": "seven"},
    ]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    directory = tmp_path / "c"
    assert (
        cli(
            "init",
            "--campaign_dir",
            directory,
            "--base_model",
            tiny_chat_base,
            *CAMPAIGN_INIT,
            "--knowledge_data",
            items,
        )
        == 0
    )
    assert Campaign(directory).knowledge_pool["source"] == str(items)
    before = snapshot(directory)
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", months["m1"]) == 2
    message = capsys.readouterr().err
    assert "Month 'm1' was not registered: 1 of your knowledge items" in message and "'seven'" in message
    assert snapshot(directory) == before  # nothing registered, no data written
    # a malformed file is refused at init, naming the line
    items.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert (
        cli("init", "--campaign_dir", tmp_path / "d", "--base_model", tiny_chat_base, "--knowledge_data", items) == 2
    )
    assert "line 1: `distractors` must be a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "d" / "campaign.json").exists()


def test_builtin_pool_excludes_what_the_months_use_and_columns_stay_comparable():
    pool = {"source": "builtin", "items": [], "excluded": {}}
    pool["items"] = [
        {"question": "What is the capital of France?", "answer": "Paris", "distractors": ["Lyon"], "entity": "France"},
        {"question": "What is the capital of Peru?", "answer": "Lima", "distractors": ["Quito"], "entity": "Peru"},
    ]
    rows = [{"prompt": [{"role": "user", "content": "Tell me about France."}], "chosen": "a", "rejected": "b"}]
    assert Campaign._exclude(pool, "m1", [rows]) == 1 and pool["excluded"] == {"0": "m1"}
    # every column is re-aggregated on the surviving items; exact match on those every column answered
    history = {
        "month-0": {"knowledge": {"mc": [1, 0, 1], "exact": {"items": [0, 1, 2], "scores": [1, 0, 1]}}},
        "m1": {"knowledge": {"mc": [0, 1, 1], "exact": {"items": [1, 2], "scores": [1, 1]}}},
    }
    table = knowledge_table(history, ["month-0", "m1"], surviving=[1, 2])
    assert table["n_mc"] == 2 and table["mc"]["month-0"]["mean"] == 0.5 and table["mc"]["m1"]["mean"] == 1.0
    assert table["n_exact"] == 2 and table["exact"]["month-0"]["mean"] == 0.5


def test_a_month_without_a_separating_feature_has_no_bleed_and_the_report_says_so():
    signature, note = fit_style_signature(["red blue"] * 4, ["blue red"] * 4)
    assert signature is None and note.startswith("no style signature")
    tests = month_tests({"style_signature": None, "style_note": note})
    assert tests["bleed"] == [] and tests["note"] == note
    # a month with a signature gets one
    signature, _ = fit_style_signature(['{"currency": "euro"}'] * 4, ["It is the euro, I think."] * 4)
    assert month_tests({"style_signature": signature})["bleed_source"] == "style_signature"
    history = {
        "m1": {
            "behaviour": {
                "m1": {"scored_by": "agreement", "scores": [1.0, 0.5], "agreement": [1.0, 0.5], "checks": {}}
            },
            "bleed": {"m1": {"styles": None, "note": note}},
        }
    }
    report = format_report(history, ["m1"])
    assert f"| m1 | none: {note} |" in report
    assert retention_numbers(history, ["m1"])["average"]["mean"] == 0.75


def test_checks_from_the_campaign_config(tmp_path):
    config = CampaignConfig(checks={"m1": SAYS_YES, "m2": {"bleed_checks": [{"json_schema": {"type": "object"}}]}})
    assert config.checks["m1"] == {"checks": SAYS_YES, "bleed_checks": []}
    assert config.checks["m2"]["bleed_checks"] == [{"json_schema": {"type": "object"}}]
    assert CampaignConfig(checks='{"m1": [{"regex": "^yes$"}]}').checks["m1"]["checks"] == [{"regex": "^yes$"}]
    with pytest.raises(ValueError, match=r"Invalid check spec .*'callable': 'no_such_module:f'"):
        CampaignConfig(checks={"m1": [{"callable": "no_such_module:f"}]})
