"""The monthly campaign on a tiny Llama: the `continual-dpo` CLI end to end, a month killed mid-way that resumes to
the same result, corrupted or mismatched state, and the push dry run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import SCRIPTS_DIR, WORDS, cli, copy_of, write_month

from peft_selective.campaign.campaign import Campaign, CampaignError
from peft_selective.campaign.cli import main


@pytest.fixture(scope="module")
def month_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"m1": write_month(folder / "m1.jsonl", "yes", "no"), "m2": write_month(folder / "m2.jsonl", "good", "bad")}


def test_two_month_campaign_through_the_cli(one_month_campaign, month_files, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", month_files["m2"]) == 0
    out = capsys.readouterr().out
    assert "Month m2 done: 4 steps" in out and "backward transfer +" in out  # a short summary; `report` has the tables
    campaign = Campaign(directory)
    assert campaign.done_months == ["m1", "m2"]
    for name in ("m1", "m2"):
        assert (directory / "adapters" / name / "adapter_model.safetensors").is_file()
        assert (directory / "cards" / name / "README.md").is_file()
        assert (directory / "data" / name / "reference_logps.json").is_file()
    assert not (directory / "runs" / "m2").exists()  # checkpoints are removed once the month is done
    retention = campaign.retention()
    assert retention["R"][0][1] is None and all(v is not None for v in retention["R"][1])
    assert set(campaign.evaluations) == {"month-0", "m1", "m2"}
    general = campaign.evaluations["m2"]["general"]
    assert {"perplexity", "kl_to_base", "refusal_rate", "drift_json"} <= set(general)
    knowledge = campaign.evaluations["m2"]["knowledge"]
    assert len(knowledge["mc"]) == 3 and set(knowledge["summary"]) == {"mc", "exact"}
    assert set(campaign.evaluations["m2"]["behaviour"]) == {"m1", "m2"} and set(campaign.evaluations["m2"]["bleed"])
    # month 2 trained on rehearsed month-1 rows, and the Fisher covers both months
    assert campaign.month("m2")["data"]["rehearsal_rows"] > 0
    assert json.loads((directory / "fisher" / "fisher.json").read_text())["months"] == ["m1", "m2"]
    assert campaign.month("m2")["training"]["steps"] == 4
    # the stored month-2 model is the one evaluated: reloading reproduces its preference results
    assert cli("eval", "--campaign_dir", directory, "--recompute") == 0
    assert Campaign(directory).evaluations["m2"]["preference"] == campaign.evaluations["m2"]["preference"]
    capsys.readouterr()
    assert cli("report", "--campaign_dir", directory) == 0
    out = capsys.readouterr().out
    assert "| after \\ on | m1 | m2 |" in out and "| m2 |" in out


def test_a_month_killed_mid_way_resumes_to_the_same_result(one_month_campaign, month_files, tmp_path):
    straight = copy_of(one_month_campaign, tmp_path / "straight")
    assert cli("run-month", "m2", "--campaign_dir", straight, "--data", month_files["m2"]) == 0
    killed = copy_of(one_month_campaign, tmp_path / "killed")
    script = SCRIPTS_DIR / "campaign_kill.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(killed), "m2", month_files["m2"], "3"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL right after step 3, checkpoint-2 on disk
    assert (killed / "runs" / "m2" / "checkpoint-2").is_dir()
    assert Campaign(killed).month("m2")["status"] == "training"
    # rerun without --data: the stored month data is used, training continues from checkpoint-2
    assert cli("run-month", "m2", "--campaign_dir", killed) == 0
    a = load_file(str(straight / "adapters" / "m2" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapters" / "m2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    resumed, reference = (Campaign(d).evaluations["m2"]["preference"] for d in (killed, straight))
    for month in ("m1", "m2"):
        for key in ("ranking_margin", "implicit_reward_margin"):
            assert resumed[month][key] == pytest.approx(reference[month][key], abs=1e-5)
    # nothing done twice: the buffer has each month once, the Fisher covers each month once
    assert json.loads((killed / "fisher" / "fisher.json").read_text())["months"] == ["m1", "m2"]
    assert json.loads((killed / "buffer" / "manifest.json").read_text())["months"][1]["name"] == "m2"


def test_resuming_with_other_data_is_refused(one_month_campaign, month_files, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    campaign = Campaign(directory)
    campaign.months.append({"name": "m2", "status": "training", "data": {"source": "x", "train_sha256": "0" * 64}})
    campaign._save_state()
    (directory / "data" / "m2").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(directory / "data" / "m1" / f"{split}.jsonl", directory / "data" / "m2" / f"{split}.jsonl")
    assert cli("run-month", "m3", "--campaign_dir", directory, "--data", month_files["m2"]) == 2
    assert "'m2' was interrupted" in capsys.readouterr().err
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", month_files["m2"]) == 2
    assert "started with other training data" in capsys.readouterr().err


def test_done_month_and_bad_names_are_refused(one_month_campaign, month_files, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", month_files["m1"]) == 2
    assert "already done" in capsys.readouterr().err
    assert cli("run-month", "../x", "--campaign_dir", directory, "--data", month_files["m1"]) == 2
    assert "Invalid month name" in capsys.readouterr().err
    assert cli("run-month", "m9", "--campaign_dir", directory, "--data", str(tmp_path / "nope.jsonl")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupted_or_mismatched_state_gives_a_clear_error(one_month_campaign, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    state = (directory / "campaign.json").read_text()
    (directory / "campaign.json").write_text(state[: len(state) // 2])
    assert cli("report", "--campaign_dir", directory) == 2
    assert "campaign.json is corrupted" in capsys.readouterr().err
    (directory / "campaign.json").write_text(state)
    # a tampered adapter
    weights = directory / "adapters" / "m1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CampaignError, match="SHA-256 mismatch"):
        Campaign(directory).load_model()
    # another base model
    data = json.loads(state)
    data["base_fingerprint"]["hidden_size"] = 4096
    (directory / "campaign.json").write_text(json.dumps(data))
    with pytest.raises(CampaignError, match="does not match the one this campaign was trained on"):
        Campaign(directory).load_base()
    assert cli("report", "--campaign_dir", tmp_path / "nowhere") == 2
    assert "No campaign in" in capsys.readouterr().err


def test_partial_or_mismatched_adapter_gives_a_clear_error(one_month_campaign, tmp_path):
    """A file that is not the adapter its config describes fails to load even when its checksum was recorded for it
    (e.g. a save that lost a tensor): PEFT itself only warns about a missing tensor and ignores an unexpected one."""
    import hashlib

    from safetensors.torch import save_file

    directory = copy_of(one_month_campaign, tmp_path)
    weights = directory / "adapters" / "m1" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]

    def write(edited: dict) -> None:
        save_file(edited, weights)
        state = json.loads((directory / "campaign.json").read_text())
        (month,) = [m for m in state["months"] if m["name"] == "m1"]
        month["adapter_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        month["files"]["adapters/m1/adapter_model.safetensors"] = month["adapter_sha256"]  # every checksum agrees
        (directory / "campaign.json").write_text(json.dumps(state))

    write({k: v for k, v in tensors.items() if k != first})
    with pytest.raises(CampaignError, match=rf"month 'm1'.*missing tensors: {first}"):
        Campaign(directory).load_model()
    extra = first.rpartition(".")[0] + ".selective_extra"
    write({**tensors, extra: torch.zeros(2)})
    with pytest.raises(CampaignError, match=rf"unexpected tensors: {extra}"):
        Campaign(directory).load_model()
    write({**tensors, first: torch.zeros(1, 1)})
    with pytest.raises(CampaignError, match=r"(?s)does not fit the model.*size mismatch for .*selective_delta"):
        Campaign(directory).load_model()
    # the same tensors under peft-selective 0.1.0's names still load
    write({k.replace(".selective_", "."): v for k, v in tensors.items()})
    Campaign(directory).load_model()


def test_push_dry_run_lists_the_files(one_month_campaign, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    directory = copy_of(one_month_campaign, tmp_path)
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 0
    out = capsys.readouterr().out
    for path in (
        "months/m1/adapter_model.safetensors",
        "months/m1/README.md",
        "adapter_model.safetensors",
        "README.md",
    ):
        assert f"\n  {path}  <-  " in out, path


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "run-month" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["run-month", "--help"])
    assert exit_info.value.code == 0
    assert "--rehearsal_ratio" not in capsys.readouterr().out  # run-month's own options only


def test_a_month_under_two_processes(one_month_campaign, month_files, tmp_path):
    """`accelerate launch` with 2 processes (gloo on CPU): both train month 2 in step, the main one writes."""
    directory = copy_of(one_month_campaign, tmp_path)
    script = SCRIPTS_DIR / "campaign_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(script), str(directory), "m2", month_files["m2"]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    histories = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    losses = [[entry["loss"] for entry in history if "loss" in entry] for history in histories]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    campaign = Campaign(directory)
    assert campaign.done_months == ["m1", "m2"] and "m2" in campaign.evaluations
    assert (directory / "cards" / "m2" / "README.md").is_file()
    assert json.loads((directory / "buffer" / "manifest.json").read_text())["months"][1]["name"] == "m2"


def test_eval_adds_lm_eval_tasks_on_the_stacked_model(one_month_campaign, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from peft_selective.evaluation import KnowledgeItem, write_knowledge_task

    directory = copy_of(one_month_campaign, tmp_path)
    items = [KnowledgeItem(f"what is {w}", w, [x for x in WORDS if x != w][:3]) for w in WORDS[:6]]
    tasks = write_knowledge_task(items, tmp_path / "tasks", task_name="tiny_words")
    assert cli(
        "eval", "--campaign_dir", directory, "--lm_eval_tasks", "tiny_words", "--lm_eval_include_path",
        Path(tasks).parent if Path(tasks).is_file() else tasks, "--lm_eval_limit", "6",
    ) == 0  # fmt: skip
    capsys.readouterr()
    stored = json.loads((directory / "evaluations.json").read_text())["m1"]["lm_eval"]["tiny_words"]
    acc = stored["acc"]
    assert 0.0 <= acc["mean"] <= 1.0 and stored["n"] == 6
    lo, hi = acc["ci95"]
    assert lo <= acc["mean"] <= hi
