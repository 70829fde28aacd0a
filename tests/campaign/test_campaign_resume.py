"""A month interrupted after its last checkpoint, or inside a checkpoint write, resumes to the uninterrupted result:
the incomplete checkpoint is skipped, and a checkpoint at max_steps is not trained one step further."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import CAMPAIGN_INIT, cli, copy_of, write_month

from peft_selective.campaign.campaign import Campaign


@pytest.fixture(scope="module")
def month_1(tmp_path_factory) -> str:
    return write_month(tmp_path_factory.mktemp("data") / "m1.jsonl", "yes", "no")


@pytest.fixture(scope="module")
def empty_campaign(tmp_path_factory, tiny_chat_base) -> Path:
    directory = tmp_path_factory.mktemp("campaign") / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    return directory


@pytest.fixture(scope="module")
def straight(empty_campaign, month_1, tmp_path_factory) -> Path:
    """Month m1 (12 training rows, batch 4, 4 steps: the last checkpoint is in the second epoch), uninterrupted."""
    directory = copy_of(empty_campaign, tmp_path_factory.mktemp("straight"))
    assert cli("run-month", "m1", "--campaign_dir", directory, "--data", month_1) == 0
    return directory


def assert_same_month(directory: Path, reference: Path) -> None:
    assert Campaign(directory).month("m1")["training"]["steps"] == 4
    a, b = (load_file(str(d / "adapters" / "m1" / "adapter_model.safetensors")) for d in (directory, reference))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_a_month_interrupted_after_its_last_checkpoint_is_not_trained_further(
    empty_campaign, month_1, straight, tmp_path, monkeypatch
):
    directory = copy_of(empty_campaign, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("killed during the evaluation")

    monkeypatch.setattr(Campaign, "_evaluate", crash)
    with pytest.raises(RuntimeError, match="killed"):
        Campaign(directory).run_month("m1", month_1)
    monkeypatch.undo()
    assert (directory / "runs" / "m1" / "checkpoint-4" / "trainer_state.json").is_file()
    assert cli("run-month", "m1", "--campaign_dir", directory) == 0
    assert_same_month(directory, straight)


def test_a_checkpoint_cut_by_a_full_disk_is_skipped(empty_campaign, month_1, straight, tmp_path, monkeypatch, caplog):
    from transformers.trainer_callback import TrainerState

    directory = copy_of(empty_campaign, tmp_path)
    save = TrainerState.save_to_json

    def full_disk(self, json_path):
        if Path(json_path).parent.name == "checkpoint-4":
            Path(json_path).write_text('{"best_global_step": nu')
            raise OSError(28, "No space left on device")
        return save(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Campaign(directory).run_month("m1", month_1)
    monkeypatch.undo()
    assert cli("run-month", "m1", "--campaign_dir", directory) == 0  # resumes from checkpoint-2
    assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert_same_month(directory, straight)
