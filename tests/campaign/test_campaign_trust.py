"""What the campaign directory can be trusted with (issue #16, part B): a month is validated before it is registered
(rows named by their line in the user's file, reserved names, the test split capped), an interrupted month can be
abandoned, `init --overwrite` starts clean, every state file the campaign relies on is checksummed (the base model by a
sample of its weights), `push` uploads only regular files inside the directory whose checksums match, and state
files are written with the user's umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from testing_utils import CAMPAIGN_INIT, cli, copy_of, tiny_chat_llama, word_chat_tokenizer, write_month
from transformers import TrainerCallback

from peft_selective.campaign.campaign import FORMAT_VERSION, Campaign, CampaignError


class _StopAtTrainBegin(TrainerCallback):
    """Stops `run_month` once the month is registered and measured, before any step: an interrupted month."""

    class Stop(Exception):
        pass

    def on_train_begin(self, args, state, control, **kwargs):
        raise self.Stop


def _interrupted(directory: Path, name: str, data: str, **kwargs) -> Campaign:
    campaign = Campaign(directory)
    with pytest.raises(_StopAtTrainBegin.Stop):
        campaign.run_month(name, data, callbacks=[_StopAtTrainBegin()], **kwargs)
    return Campaign(directory)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """This module's own copy of the tiny chat base (a test replaces its weights in place)."""
    path = tmp_path_factory.mktemp("base")
    tiny_chat_llama(seed=0).save_pretrained(path)
    word_chat_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_month(folder / "m1.jsonl", "yes", "no")
    write_month(folder / "m2.jsonl", "good", "bad")
    return folder


@pytest.fixture(scope="module")
def done(tmp_path_factory, base_dir, data_dir) -> Path:
    """A campaign with month m1 done (copied by the tests that change it)."""
    directory = tmp_path_factory.mktemp("campaign") / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", base_dir, *CAMPAIGN_INIT) == 0
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", data_dir / "m1.jsonl") == 0
    return directory


def _fresh(tmp_path: Path, base_dir: Path, *options) -> Path:
    directory = tmp_path / "fresh"
    assert cli("init", "--campaign_dir", directory, "--base_model", base_dir, *CAMPAIGN_INIT, *options) == 0
    return directory


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------------- 4. stuck campaigns
def test_long_prompts_are_refused_before_registration_naming_the_users_line(tmp_path, base_dir, data_dir, capsys):
    directory = _fresh(tmp_path, base_dir)
    state = (directory / "campaign.json").read_bytes()
    rows = _rows(data_dir / "m1.jsonl")
    rows[3]["prompt"][0]["content"] = " ".join(["red"] * 80)  # 80 tokens > max_length 64
    train = _write_rows(tmp_path / "long_train.jsonl", rows)
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", train) == 2
    err = capsys.readouterr().err
    assert f"{train}, line 4" in err and "max_length=64" in err and "was not registered" in err
    # the test split too: a long test prompt would count as wrong forever
    test = _write_rows(tmp_path / "long_test.jsonl", rows[2:6])
    assert (
        cli("run-month", "m1", "--campaign_dir", directory, "--data", data_dir / "m1.jsonl", "--test_data", test) == 2
    )
    err = capsys.readouterr().err
    assert f"{test}, line 2" in err and "max_length=64" in err
    assert (directory / "campaign.json").read_bytes() == state  # nothing registered, nothing written
    assert sorted(p.name for p in directory.iterdir()) == ["campaign.json"]


def test_the_long_prompt_fix_the_error_names_is_an_init_option(tmp_path, base_dir, data_dir, capsys):
    rows = _rows(data_dir / "m1.jsonl")
    rows[3]["prompt"][0]["content"] = " ".join(["red"] * 80)
    train = _write_rows(tmp_path / "long_train.jsonl", rows)
    directory = _fresh(tmp_path, base_dir)
    assert (
        cli("run-month", "m1", "--campaign_dir", directory, "--data", train, "--test_data", data_dir / "m1.jsonl") == 2
    )
    assert "`init --drop_long_prompts`" in capsys.readouterr().err
    shutil.rmtree(directory)
    directory = _fresh(tmp_path, base_dir, "--drop_long_prompts")
    assert Campaign(directory).config.training["drop_long_prompts"] is True
    assert (
        cli("run-month", "m1", "--campaign_dir", directory, "--data", train, "--test_data", data_dir / "m1.jsonl") == 0
    )
    assert Campaign(directory).month("m1")["status"] == "done"


@pytest.mark.parametrize("name", ["month-0", "ref"])
def test_reserved_month_names_are_refused(tmp_path, base_dir, data_dir, capsys, name):
    directory = _fresh(tmp_path, base_dir)
    assert cli("run-month", name, "--campaign_dir", directory, "--data", data_dir / "m1.jsonl") == 2
    assert f"{name!r} is reserved" in capsys.readouterr().err
    assert sorted(p.name for p in directory.iterdir()) == ["campaign.json"]
    state = json.loads((directory / "campaign.json").read_text())
    state["months"] = [{"name": name, "status": "done"}]
    (directory / "campaign.json").write_text(json.dumps(state))
    with pytest.raises(CampaignError, match=f"{name!r} is reserved"):
        Campaign(directory)


def test_unreadable_data_files_are_named_with_their_line(tmp_path, base_dir, data_dir, capsys):
    directory = _fresh(tmp_path, base_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    lines = (data_dir / "m1.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"prompt": "x", "chosen":'] + lines[3:]) + "\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(("\n".join(lines[:4]) + "\n").encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    for path, expected in ((empty, "holds no rows"), (bad, "line 3: not JSON"), (latin, "line 5: not UTF-8")):
        assert cli("run-month", "m1", "--campaign_dir", directory, "--data", path) == 2
        err = capsys.readouterr().err
        assert f"{path}" in err and expected in err, err
    assert sorted(p.name for p in directory.iterdir()) == ["campaign.json"]


def test_init_overwrite_starts_clean(done, tmp_path, base_dir, capsys):
    directory = copy_of(done, tmp_path)
    (directory / "notes.txt").write_text("the user's own file")
    assert cli("init", "--campaign_dir", directory, "--base_model", base_dir, *CAMPAIGN_INIT) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli("init", "--campaign_dir", directory, "--base_model", base_dir, *CAMPAIGN_INIT, "--overwrite") == 0
    # the old base evaluation, Fisher, buffer, data, adapters and cards are gone; the user's file is not
    assert sorted(p.name for p in directory.iterdir()) == ["campaign.json", "notes.txt"]
    campaign = Campaign(directory)
    assert campaign.months == [] and campaign.evaluations == {} and campaign.state["base_fingerprint"] is None


def test_an_interrupted_month_can_be_abandoned(tmp_path, base_dir, data_dir, capsys):
    directory = _fresh(tmp_path, base_dir)
    campaign = _interrupted(directory, "m1", str(data_dir / "m1.jsonl"))
    assert campaign.month("m1")["status"] == "training" and (directory / "data" / "m1").is_dir()
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", data_dir / "m2.jsonl") == 2
    assert "continual-dpo abandon m1" in capsys.readouterr().err
    assert cli("abandon", "m1", "--campaign_dir", directory) == 0
    campaign = Campaign(directory)
    assert campaign.months == [] and not (directory / "data" / "m1").exists()
    assert set(campaign.evaluations) == {"month-0"}  # the base's evaluation does not depend on the month
    assert cli("abandon", "m1", "--campaign_dir", directory) == 2
    assert "no interrupted month 'm1'" in capsys.readouterr().err


def test_a_done_month_cannot_be_abandoned_and_a_lost_evaluation_is_named(done, tmp_path, capsys):
    directory = copy_of(done, tmp_path)
    assert cli("abandon", "m1", "--campaign_dir", directory) == 2
    assert "'m1' is done" in capsys.readouterr().err
    (directory / "evaluations.json").unlink()
    assert cli("report", "--campaign_dir", directory) == 2
    err = capsys.readouterr().err
    assert "evaluations.json is missing" in err and "month-0" in err and "m1" in err


# ------------------------------------------------------------------------------------------------- 5. paths and trust
def test_push_refuses_symlinks_out_of_the_campaign(done, tmp_path, capsys):
    directory = copy_of(done, tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the Hub")
    plot = directory / "cards" / "m1" / "retention.png"
    plot.unlink()
    plot.symlink_to(outside)
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 2
    err = capsys.readouterr().err
    assert "retention.png" in err and "symbolic link" in err
    # a linked folder too
    shutil.rmtree(directory)
    directory = copy_of(done, tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.move(directory / "adapters" / "m1", moved)
    (directory / "adapters" / "m1").symlink_to(moved, target_is_directory=True)
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 2
    assert "symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize("filename", ["adapter_model.safetensors", "adapter_config.json"])
def test_push_refuses_a_file_whose_checksum_changed(done, tmp_path, capsys, filename):
    directory = copy_of(done, tmp_path)
    path = directory / "adapters" / "m1" / filename
    path.write_bytes(path.read_bytes() + b" ")
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 2
    err = capsys.readouterr().err
    assert f"adapters/m1/{filename}" in err and "SHA-256" in err


def test_crafted_names_in_state_are_refused(done, tmp_path, capsys):
    directory = copy_of(done, tmp_path / "inside")
    state = json.loads((directory / "campaign.json").read_text())
    state["months"][0]["name"] = "../../escaped"
    (directory / "campaign.json").write_text(json.dumps(state))
    for command in (("report",), ("push", "--repo_id", "me/adapters", "--dry_run")):
        assert cli(*command, "--campaign_dir", directory) == 2
        assert "Invalid month name '../../escaped'" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists()


# ------------------------------------------------------------------------------------------------- 6. checksums
def _edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


TAMPERED = {
    "adapters/m1/adapter_config.json": lambda p: _edit_json(p, lambda c: c.update(alpha=400)),
    "data/m1/test.jsonl": lambda p: p.write_text(p.read_text().replace("yes", "no")),
    "data/m1/train.jsonl": lambda p: p.write_text(p.read_text().replace("yes", "no")),
    "data/m1/reference_logps.json": lambda p: p.write_text(p.read_text().replace("-", "+", 1)),
    "data/m1/before_behaviour.json": lambda p: p.write_text(p.read_text().replace("0", "1", 1)),
    "evaluations.json": lambda p: _edit_json(p, lambda e: e["m1"].update(general={})),
    "fisher/fisher.json": lambda p: _edit_json(p, lambda f: f.update(months=["m1", "m0"])),
    "buffer/manifest.json": lambda p: p.write_text(p.read_text() + " "),
}


@pytest.mark.parametrize("relative", list(TAMPERED))
def test_every_state_file_is_checksummed(done, tmp_path, data_dir, capsys, relative):
    directory = copy_of(done, tmp_path)
    TAMPERED[relative](directory / relative)
    command = (
        ("run-month", "m2", "--data", data_dir / "m2.jsonl")
        if relative.startswith(("fisher", "buffer"))
        else (("report",))
    )
    assert cli(*command, "--campaign_dir", directory) == 2
    err = capsys.readouterr().err
    assert relative in err and "changed since" in err, err
    assert Campaign(directory).done_months == ["m1"]


def test_an_edited_config_is_detected(done, tmp_path, capsys):
    directory = copy_of(done, tmp_path)
    _edit_json(directory / "campaign.json", lambda s: s["config"]["training"].update(learning_rate=0.5))
    assert cli("report", "--campaign_dir", directory) == 2
    err = capsys.readouterr().err
    assert "config" in err and "changed since" in err, err
    with pytest.raises(CampaignError, match=r"config .*changed since"):
        Campaign(directory)


def test_base_weights_replaced_in_place_are_detected(done, tmp_path, base_dir):
    directory = copy_of(done, tmp_path)
    weights = base_dir / "model.safetensors"
    original = weights.read_bytes()
    try:
        other = tiny_chat_llama(seed=1)  # same shapes, other values
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, weights, metadata={"format": "pt"})
        with pytest.raises(CampaignError, match="weights .*differ from those this campaign was trained on"):
            Campaign(directory).load_base()
    finally:
        weights.write_bytes(original)
    Campaign(directory).load_base()


# ------------------------------------------------------------------------------------------------- 7. limits, modes
def test_the_test_split_is_capped_and_sampled(tmp_path, base_dir, data_dir):
    directory = _fresh(tmp_path, base_dir, "--max_test_rows", "3")
    test = tmp_path / "test.jsonl"
    write_month(test, "yes", "no", n=8)
    campaign = _interrupted(directory, "m1", str(data_dir / "m1.jsonl"), test_data=str(test))
    data = campaign.month("m1")["data"]
    assert data["test_rows"] == 3 and data["test_rows_given"] == 8 and "max_test_rows" in data["test_sampled"]
    assert len(_rows(directory / "data" / "m1" / "test.jsonl")) == 3


def test_state_files_follow_the_umask(tmp_path, base_dir):
    previous = os.umask(0o022)
    try:
        directory = _fresh(tmp_path, base_dir)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((directory / "campaign.json").stat().st_mode) == 0o644


def test_a_format_2_campaign_is_read_and_upgraded(done, tmp_path, capsys):
    """campaign.json of format 2 recorded only the adapter weights' checksum and the base's shapes: it still reports
    and pushes (its weights still checked), and the next write records the rest."""
    directory = copy_of(done, tmp_path)
    state = json.loads((directory / "campaign.json").read_text())
    for key in ("config_sha256", "evaluations_sha256", "shared_files"):
        state.pop(key)
    state["format_version"] = 2
    state["base_fingerprint"].pop("weights_sha256")
    for month in state["months"]:
        month.pop("files")
    (directory / "campaign.json").write_text(json.dumps(state))
    assert cli("report", "--campaign_dir", directory) == 0
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 0
    capsys.readouterr()
    weights = directory / "adapters" / "m1" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b" ")
    assert cli("push", "--campaign_dir", directory, "--repo_id", "me/adapters", "--dry_run") == 2
    assert "SHA-256" in capsys.readouterr().err
    weights.write_bytes(original)
    campaign = Campaign(directory)
    campaign.load_base()
    campaign._save_state()
    upgraded = json.loads((directory / "campaign.json").read_text())
    assert upgraded["format_version"] == FORMAT_VERSION and "config_sha256" in upgraded
    assert "weights_sha256" in upgraded["base_fingerprint"]


def _write_lines(path: Path, items: list) -> Path:
    """A JSONL file of `items`: a row dict is written as JSON, a string as it is (blank lines)."""
    path.write_text("".join((json.dumps(item) if isinstance(item, dict) else item) + "\n" for item in items))
    return path


def _malformed(row: dict, kind: str) -> dict:
    row = json.loads(json.dumps(row))
    if kind == "empty chosen":
        row["chosen"][0]["content"] = ""
    elif kind == "identical":
        row["rejected"] = row["chosen"]
    elif kind == "missing rejected":
        del row["rejected"]
    elif kind == "plain text in a conversational file":
        row["chosen"] = "yes"
    elif kind == "wrong type":
        row["prompt"] = 5
    return row


_PROBLEMS = {
    "empty chosen": "'chosen' has a 'assistant' message with empty content",
    "identical": "'chosen' and 'rejected' are identical",
    "missing rejected": "'rejected' is missing",
    "plain text in a conversational file": "'chosen' is a str, but the dataset is conversational",
    "wrong type": "'prompt' is a int, but the dataset is conversational",
}


@pytest.mark.parametrize("kind", list(_PROBLEMS))
def test_malformed_train_rows_are_named_by_their_line_before_registration(tmp_path, base_dir, data_dir, capsys, kind):
    """Issue #16 item 4: a malformed row is named by its line in the user's file (blank lines count, as an editor
    counts them), not by a row index, and the month is not registered."""
    directory = _fresh(tmp_path, base_dir)
    state = (directory / "campaign.json").read_bytes()
    rows = _rows(data_dir / "m1.jsonl")
    items = ["", rows[0], "  ", "", rows[1], rows[2], _malformed(rows[3], kind), *rows[4:]]  # the bad row: line 7
    train = _write_lines(tmp_path / "train.jsonl", items)
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", train) == 2
    err = capsys.readouterr().err
    assert f"{train}, line 7: {_PROBLEMS[kind]}" in err and "was not registered" in err, err
    assert "row 3" not in err and "row 4" not in err, err
    assert (directory / "campaign.json").read_bytes() == state
    assert not (directory / "data" / "m1").exists()


def test_malformed_test_rows_are_named_by_their_line_before_registration(tmp_path, base_dir, data_dir, capsys):
    """The same for the test file (`--test_data`), the bad row in the middle or first after blank lines."""
    directory = _fresh(tmp_path, base_dir)
    state = (directory / "campaign.json").read_bytes()
    rows = _rows(data_dir / "m1.jsonl")
    for kind, before, after in (
        ("identical", [rows[0], "", "", rows[1]], [rows[3]]),
        ("plain text in a conversational file", ["", rows[0], " "], [rows[3]]),
        ("missing rejected", ["", ""], [rows[3], rows[4]]),  # the file's first row
    ):
        test = _write_lines(tmp_path / "test.jsonl", [*before, _malformed(rows[2], kind), *after])
        args = ("--data", data_dir / "m1.jsonl", "--test_data", test)
        assert cli("run-month", "m1", "--campaign_dir", directory, *args) == 2
        err = capsys.readouterr().err
        assert f"{test}, line {len(before) + 1}: {_PROBLEMS[kind]}" in err and "was not registered" in err, err
        assert (directory / "campaign.json").read_bytes() == state
        assert not (directory / "data" / "m1").exists()


def test_the_weights_fingerprint_samples_inside_every_tensor_of_a_real_model_size():
    from peft_selective.campaign.campaign import FINGERPRINT_ELEMENTS, _weights_digest

    # the bundled model's embedding has 28,311,552 elements: float32 positions rounded its last index past the end
    module = torch.nn.Module()
    module.register_buffer("embed", torch.zeros(49152 * 576, dtype=torch.int8))
    module.embed[-1] = 1
    before = _weights_digest(module)
    module.embed[-1] = 2  # the last element is always sampled
    changed = _weights_digest(module)
    assert changed != before
    assert FINGERPRINT_ELEMENTS < module.embed.numel()
    module.embed[1] = 3  # an element between two samples is not: the documented limit
    assert _weights_digest(module) == changed
