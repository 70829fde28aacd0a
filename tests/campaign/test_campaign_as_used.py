"""The campaign as users meet it: what the commands print (no known-irrelevant third-party warning unless
`--verbose`), `eval` reading what `run-month` measured, the README's `push` lines, and the errors of the commonest
mistakes naming their fix."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from testing_utils import CAMPAIGN_INIT, REPO_ROOT, cli, copy_of, write_month

from peft_selective.campaign.campaign import MONTH_PHASES, Campaign, format_report, month_time_split
from peft_selective.utils.warnings import (
    BITSANDBYTES_KERNEL_NOTICE,
    KNOWN_FUTURE_WARNINGS,
    hold_back_import_notices,
    quiet_known_warnings,
    release_held_back,
)


BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KNOWN = ("`is_gradient_checkpointing` is deprecated", "`gradient_checkpointing` is deprecated", BNB_NOTICE)


def _bnb_emits_its_notice() -> bool:
    """bitsandbytes prints its kernel notice only on CPUs with AVX512-BF16 and without the `kernels` package."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    try:
        import kernels  # noqa: F401
    except ImportError:
        return bool(has_avx512bf16())
    return False


def _continual_dpo(*argv) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: the bitsandbytes notice is printed at import, once per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "peft_selective.campaign.cli", *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def months(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"m1": write_month(folder / "m1.jsonl", "yes", "no"), "m2": write_month(folder / "m2.jsonl", "good", "bad")}


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory, tiny_chat_base, months) -> Path:
    """A campaign without a Hub repo, month m1 done through the CLI in its own process (copied by the tests)."""
    directory = tmp_path_factory.mktemp("campaign") / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    result = _continual_dpo("run-month", "m1", "--campaign_dir", directory, "--data", months["m1"])
    assert result.returncode == 0, result.stderr[-3000:]
    directory.joinpath("run-month.out").write_text(result.stdout)
    directory.joinpath("run-month.err").write_text(result.stderr)
    return directory


# ------------------------------------------------------------------------------------------------- output
def test_a_month_prints_no_known_warning_and_a_short_summary(campaign_dir):
    out, err = (campaign_dir / "run-month.out").read_text(), (campaign_dir / "run-month.err").read_text()
    for message in KNOWN:
        assert message not in err, message
    assert "{'loss'" not in out + err  # the Trainer's per-step metrics go to the log (--verbose)
    assert "Training m1:" in err and "Behaviour m1:" in err  # a named progress bar per long step
    assert "Flattening the indices" not in err  # not one per datasets map
    assert out.startswith("Month m1 done: 4 steps")
    assert "backward transfer n/a (needs two months)." in out
    assert re.search(r"^  Time: \d+ s; training \d+ s, evaluation \d+ s \(and month 0's, once: \d+ s\)\.$", out, re.M)
    assert len(out.splitlines()) <= 6


def test_every_long_step_has_a_named_progress_bar(campaign_dir):
    """The month's data, its tokenization, what is measured before it, training, each suite of the evaluations and
    the Fisher each show a bar with its name (the rehearsal rows' reference log-probs too, when the training has not
    computed them all already)."""
    err = (campaign_dir / "run-month.err").read_text()
    bars = {piece.split(":")[0] for piece in re.split(r"[\r\n]", err) if re.search(r": +\d+%\|", piece)}
    expected = {
        "Checking m1's prompt lengths", "Tokenizing train dataset", "Reference log-probs (test pairs)",
        "Behaviour m1 (before the month)", "Training m1", "Preference m1", "Behaviour m1", "Bleed (generic prompts)",
        "Knowledge (multiple choice)", "Knowledge (exact match)", "Perplexity", "KL to the base",
        "Refusal (harmful prompts)", "Refusal (benign prompts)", "Drift probe (generic prompts)",
    }  # fmt: skip
    training = Campaign(campaign_dir).config.training
    if training["ewc_coef"] > 0:
        expected.add("Fisher (m1)")
    if training["kl_coef"] > 0:
        expected.add("Anchor continuations")
    assert expected <= bars, sorted(expected - bars)


def test_a_month_records_where_its_time_goes(campaign_dir, tmp_path):
    directory = copy_of(campaign_dir, tmp_path)
    campaign = Campaign(directory)
    entry = campaign.month("m1")
    timing, suites = entry["timing_s"], entry["evaluation_suites_s"]
    assert list(timing) == [phase for phase in MONTH_PHASES if phase in timing] + ["total"]  # in the month's order
    assert {"data", "baseline_evaluation", "before_month", "trainer", "training", "evaluation", "finish"} <= set(
        timing
    )
    assert all(seconds >= 0 for seconds in timing.values())
    assert sum(v for k, v in timing.items() if k != "total") <= timing["total"] + 0.05
    assert set(suites) == {"preference", "behaviour", "bleed", "knowledge", "perplexity", "kl", "refusal", "drift"}
    assert sum(suites.values()) <= timing["evaluation"] + 0.05
    split = month_time_split(timing)
    assert split["evaluation"] == pytest.approx(timing["before_month"] + timing["evaluation"], abs=0.011)
    assert split["training"] == timing["training"] and split["baseline_evaluation"] == timing["baseline_evaluation"]
    assert f"training {split['training']:.0f} s" in campaign.month_summary("m1")
    # a month recorded by an older peft-selective has no timing: the campaign loads, the summary leaves the line out
    state = json.loads((directory / "campaign.json").read_text())
    for key in ("timing_s", "evaluation_suites_s"):
        del state["months"][0][key]
    (directory / "campaign.json").write_text(json.dumps(state))
    older = Campaign(directory)
    older.verify()
    assert month_time_split(older.month("m1").get("timing_s")) is None
    assert "Time:" not in older.month_summary("m1") and older.month_summary("m1").startswith("Month m1 done")


def test_verbose_turns_the_filter_off(campaign_dir, tmp_path):
    directory = copy_of(campaign_dir, tmp_path)
    result = _continual_dpo("eval", "--campaign_dir", directory, "--recompute", "--verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in result.stderr  # PEFT loading the adapter
    assert "DEBUG" in result.stderr or "INFO" in result.stderr
    if _bnb_emits_its_notice():
        assert BNB_NOTICE in result.stderr
    quiet = _continual_dpo("eval", "--campaign_dir", directory, "--recompute")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not any(message in quiet.stderr for message in KNOWN)


def test_only_the_known_warnings_are_silenced(caplog):
    emitted = [
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
         "instead.", FutureWarning),
        ("`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
         FutureWarning),
        ("`use_cache` is deprecated and will be removed in v6.", FutureWarning),  # unrelated: still shown
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", UserWarning),  # another category
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for message, category in emitted:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == [message for message, _ in emitted[2:]]
    assert len(KNOWN_FUTURE_WARNINGS) == 2
    name, _ = BITSANDBYTES_KERNEL_NOTICE
    bnb_logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        bnb_logger.warning("%s: No module named 'kernels'.", BNB_NOTICE)
        bnb_logger.warning("Another bitsandbytes warning.")
        assert [r.getMessage() for r in caplog.records] == ["Another bitsandbytes warning."]
        try:
            assert release_held_back() >= 1  # the held-back notice is shown on demand (--verbose)
        finally:
            hold_back_import_notices()
        assert f"{BNB_NOTICE}: No module named 'kernels'." in [r.getMessage() for r in caplog.records]


def test_backward_transfer_needs_two_months():
    history = {"m1": {"behaviour": {"m1": {"scored_by": "agreement", "scores": [1.0, 0.0], "agreement": [1.0, 0.0]}}}}
    assert "backward transfer n/a (needs two months)." in format_report(history, ["m1"])
    history["m2"] = {"behaviour": {"m2": {"scored_by": "agreement", "scores": [1.0], "agreement": [1.0]}}}
    assert "backward transfer n/a (no earlier month scored" in format_report(history, ["m1", "m2"])


# ------------------------------------------------------------------------------------------------- eval
def test_eval_reads_the_stored_evaluation_unless_asked_to_recompute(campaign_dir, tmp_path, capsys, monkeypatch):
    directory = copy_of(campaign_dir, tmp_path)
    calls = []
    evaluate = Campaign._evaluate

    def counted(self, *args, **kwargs):
        calls.append(args[2])
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Campaign, "_evaluate", counted)
    stored = json.loads((directory / "evaluations.json").read_text())["m1"]
    capsys.readouterr()
    assert cli("eval", "--campaign_dir", directory) == 0
    assert calls == [] and json.loads(capsys.readouterr().out) == stored
    assert cli("eval", "--campaign_dir", directory, "--recompute") == 0
    assert calls == [["m1"]]
    # the stored evaluation is verified before it is returned
    data = json.loads((directory / "evaluations.json").read_text())
    data["m1"]["general"]["perplexity"] = 1.0
    (directory / "evaluations.json").write_text(json.dumps(data))
    assert cli("eval", "--campaign_dir", directory) == 2
    assert "the entry 'm1' changed since the campaign wrote it" in capsys.readouterr().err
    # other options than the stored ones: measured again, saying why
    campaign = Campaign(directory)
    assert "lm-eval options" in campaign._stale_evaluation("m1", {"tasks": ["x"], "include_path": None, "limit": 2})


# ------------------------------------------------------------------------------------------------- push
def _readme_commands(command: str) -> list[list[str]]:
    """The README's `continual-dpo <command> ...` lines (comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text()
    found = re.findall(rf"^continual-dpo {command} [^\n#]*", text, flags=re.MULTILINE)
    assert found, f"no `continual-dpo {command}` line in README.md"
    return [shlex.split(line)[1:] for line in found]


def _in(argv: list[str], directory: Path) -> list[str]:
    """The README's arguments, on `directory` instead of its `campaign`."""
    return [str(directory) if previous == "--campaign_dir" else a for previous, a in zip([None, *argv], argv)]


def test_the_readme_push_lines_work_as_written(campaign_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not call the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    directory = copy_of(campaign_dir, tmp_path)
    assert Campaign(directory).config.hub_repo is None
    capsys.readouterr()
    dry_runs = [argv for argv in _readme_commands("push") if "--dry_run" in argv]
    assert dry_runs
    for argv in dry_runs:
        assert cli(*_in(argv, directory)) == 0
        out = capsys.readouterr().out
        assert "No Hub repo named" in out and "\n  months/m1/adapter_model.safetensors  <-  " in out
    for argv in _readme_commands("eval"):
        assert cli(*_in(argv, directory)) == 0
    capsys.readouterr()
    # a real push must name its repo
    assert cli("push", "--campaign_dir", directory) == 2
    err = capsys.readouterr().err
    assert "--repo_id" in err and "init --hub_repo" in err


# ------------------------------------------------------------------------------------------------- errors
def test_a_month_name_already_used_names_the_fix(campaign_dir, months, tmp_path, capsys):
    directory = copy_of(campaign_dir, tmp_path)
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", months["m2"]) == 2
    err = capsys.readouterr().err
    assert f"continual-dpo eval --month m1 --campaign_dir {directory}" in err and "new name" in err
    # a half-done month given other data: resume it, or abandon it
    campaign = Campaign(directory)
    campaign.months.append({"name": "m2", "status": "training", "data": {"source": "x", "train_sha256": "0" * 64}})
    campaign._save_state()
    (directory / "data" / "m2").mkdir(parents=True)
    for split in ("train", "test"):
        (directory / "data" / "m2" / f"{split}.jsonl").write_bytes(
            (directory / "data" / "m1" / f"{split}.jsonl").read_bytes()
        )
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", months["m2"]) == 2
    assert f"continual-dpo abandon m2 --campaign_dir {directory}" in capsys.readouterr().err


def test_data_in_another_format_than_last_month_names_both(campaign_dir, tmp_path, capsys):
    directory = copy_of(campaign_dir, tmp_path)
    state = (directory / "campaign.json").read_bytes()
    plain = tmp_path / "plain.jsonl"
    rows = [{"prompt": f"question {i}", "chosen": "good", "rejected": "bad"} for i in range(15)]
    plain.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", plain) == 2
    err = capsys.readouterr().err
    assert "is plain text (strings)" in err and "month 'm1''s is conversational" in err
    assert "write its rows as month 'm1''s" in err
    extra = tmp_path / "extra.jsonl"
    chats = [
        json.loads(line) for line in Path(write_month(tmp_path / "m2.jsonl", "good", "bad")).read_text().splitlines()
    ]
    extra.write_text("".join(json.dumps({**row, "id": i}) + "\n" for i, row in enumerate(chats)))
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", extra) == 2
    err = capsys.readouterr().err
    assert "give it the same columns (not in 'm1': id)" in err
    assert (directory / "campaign.json").read_bytes() == state and not (directory / "data" / "m2").exists()
