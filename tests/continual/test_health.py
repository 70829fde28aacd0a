"""The model-health guard (`peft_selective.continual.health`): the trainer refuses a non-finite loss and vanished gradients, and a
campaign month whose evaluation shows a broken model is refused, leaving the campaign directory byte-identical."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import transformers
import trl
from testing_utils import CAMPAIGN_INIT, cli, copy_of, train_month_1, write_month

from peft_selective.campaign import campaign as campaign_module
from peft_selective.campaign.campaign import Campaign, CampaignConfig
from peft_selective.continual import ModelHealthError
from peft_selective.continual.health import check_evaluation


# The tiny-model campaign of tests/campaign/test_campaign.py: its two months; `one_month_campaign` (conftest) has m1 done.
@pytest.fixture(scope="module")
def month_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"m1": write_month(folder / "m1.jsonl", "yes", "no"), "m2": write_month(folder / "m2.jsonl", "good", "bad")}


# ------------------------------------------------------------------------------------------------- trainer
def _poison_dpo_loss(monkeypatch, how):
    original = trl.DPOTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            return how(result[0]), result[1]
        return how(result)

    monkeypatch.setattr(trl.DPOTrainer, "compute_loss", poisoned)


def test_a_non_finite_loss_is_refused(tmp_path, monkeypatch):
    _poison_dpo_loss(monkeypatch, lambda loss: loss * float("nan"))
    with pytest.raises(ModelHealthError, match=r"step 1: the training loss is nan") as error:
        train_month_1(tmp_path)
    assert "bitsandbytes" in str(error.value) and "learning rate" in str(error.value)
    assert math.isnan(error.value.measured["loss"])


def test_vanished_gradients_are_refused(tmp_path, monkeypatch):
    _poison_dpo_loss(monkeypatch, lambda loss: loss * 0.0)  # finite loss, no gradient reaches the adapter
    with pytest.raises(ModelHealthError, match=r"step 1: the total gradient norm .* is 0") as error:
        train_month_1(tmp_path)
    assert error.value.measured["grad_norm"] == 0.0 and error.value.measured["trainable_tensors"] > 0


def test_gradients_past_the_checked_steps_and_a_disabled_guard_are_not_checked(tmp_path, monkeypatch):
    _poison_dpo_loss(monkeypatch, lambda loss: loss * 0.0)
    assert train_month_1(tmp_path / "a", health_check_steps=0).state.global_step == 3
    _poison_dpo_loss(monkeypatch, lambda loss: loss * float("nan"))
    assert train_month_1(tmp_path / "b", health_check=False).state.global_step == 3


def test_healthy_training_is_not_refused(tmp_path):
    trainer = train_month_1(tmp_path, kl_coef=0.5, kl_anchor_max_new_tokens=2, health_check_steps=3)
    assert trainer.state.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_negative_health_check_steps_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="health_check_steps"):
        train_month_1(tmp_path, health_check_steps=-1)


# ------------------------------------------------------------------------------------------------- evaluation
def _evaluation(perplexity=20.0, kl=0.05, margin=1.0):
    return {
        "preference": {"m1": {"accuracy": 0.75, "mean_margin": margin, "n": 4}},
        "general": {"perplexity": perplexity, "kl_to_base": kl, "knowledge_qa": 0.3},
    }


def test_check_evaluation_limits():
    base = _evaluation(perplexity=21.8, kl=0.0)
    result = check_evaluation("m1", _evaluation(perplexity=22.0), base, 1.5, 10.0)
    assert result["measured"]["perplexity_ratio"] == pytest.approx(22.0 / 21.8)
    assert result["limits"] == {"max_perplexity_ratio": 1.5, "max_kl_to_base": 10.0}
    with pytest.raises(ModelHealthError, match=r"perplexity 1\.05554e\+08 is 4\.842e\+06 x month 0's 21\.8") as error:
        check_evaluation("m1", _evaluation(perplexity=105_554_497.0), base, 1.5, 10.0)
    assert "max_perplexity_ratio=1.5" in str(error.value) and "bitsandbytes" in str(error.value)
    assert error.value.limits["max_perplexity_ratio"] == 1.5
    with pytest.raises(ModelHealthError, match=r"KL to the base 12\.5 nats/token \(limit: max_kl_to_base=10\.0\)"):
        check_evaluation("m1", _evaluation(kl=12.5), base, 1.5, 10.0)
    with pytest.raises(
        ModelHealthError, match=r"non-finite metrics: general/perplexity=inf, preference/m1/mean_margin=nan"
    ):
        check_evaluation("m1", _evaluation(perplexity=math.inf, margin=math.nan), base, 1.5, 10.0)
    with pytest.raises(ModelHealthError, match="the base is broken"):
        check_evaluation("m1", _evaluation(), _evaluation(perplexity=math.nan), 1.5, 10.0)
    # limits set to None are not checked; a campaign without the perplexity suite has no ratio to check
    check_evaluation("m1", _evaluation(perplexity=1e9, kl=1e3), base, None, None)
    check_evaluation("m1", {"general": {"kl_to_base": 0.1}, "preference": {}}, base, 1.5, 10.0)


def test_campaign_limits_are_validated():
    with pytest.raises(ValueError, match="max_perplexity_ratio"):
        CampaignConfig(max_perplexity_ratio=0.5)
    with pytest.raises(ValueError, match="max_kl_to_base"):
        CampaignConfig(max_kl_to_base=0.0)


# ------------------------------------------------------------------------------------------------- campaign
def snapshot(directory: Path) -> dict[str, str]:
    """Every path under `directory` with the SHA-256 of its bytes (folders too, as "dir")."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(directory.rglob("*"))
    }


def _poison_month_adapter(monkeypatch, month: str):
    """The month's trained adapter weights are replaced by huge random values (garbage weights, as a corrupted
    quantized layer gives) just before its evaluation: the activations overflow, the metrics are NaN. (Merely large
    ones would not do on this tiny random model: its final norm and near-zero LM head keep its predictions close to
    uniform whatever the MLPs output, so its perplexity barely moves; the ratio limit is checked in
    `test_the_limits_can_be_set_for_one_month_from_the_cli`.)"""
    evaluate = campaign_module.evaluate_model

    def poisoned(model, *args, **kwargs):
        if month in (kwargs.get("test_sets") or {}):
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.endswith(f".{month}") or f".{month}." in name:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e30)
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(campaign_module, "evaluate_model", poisoned)


def test_a_broken_month_is_refused_and_leaves_no_trace(one_month_campaign, month_files, tmp_path, monkeypatch, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    before = snapshot(directory)
    assert {"fisher/fisher.json", "buffer/manifest.json", "adapters/m1/adapter_model.safetensors"} <= set(before)
    _poison_month_adapter(monkeypatch, "m2")
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", month_files["m2"]) == 2
    message = capsys.readouterr().err
    assert "Month 'm2' refused: its evaluation shows a broken model" in message
    assert "non-finite metrics: general/perplexity=nan" in message and "bitsandbytes" in message
    assert "campaign.json still ends at month 'm1'" in message
    assert "higher --max_perplexity_ratio" not in message  # no limit to raise: the model is broken
    assert snapshot(directory) == before
    assert Campaign(directory).done_months == ["m1"]
    # a rerun without the poison trains the month again and records it, with what the guard measured
    monkeypatch.undo()
    assert cli("run-month", "m2", "--campaign_dir", directory, "--data", month_files["m2"]) == 0
    campaign = Campaign(directory)
    assert campaign.done_months == ["m1", "m2"] and campaign.month("m2")["training"]["steps"] == 4
    health = campaign.month("m2")["health"]
    assert health["limits"] == {"max_perplexity_ratio": 1.5, "max_kl_to_base": 10.0}
    assert health["measured"]["perplexity_ratio"] < 1.5
    assert (directory / "cards" / "m2" / "README.md").is_file()
    assert campaign.month("m2")["adapter_sha256"]


def test_a_broken_first_month_leaves_only_the_initial_campaign(tiny_chat_base, month_files, tmp_path, monkeypatch):
    """The first month also evaluates the base (month 0) and creates the buffer and Fisher: all of it is undone."""
    directory = tmp_path / "c"
    assert cli("init", "--campaign_dir", directory, "--base_model", tiny_chat_base, *CAMPAIGN_INIT) == 0
    before = snapshot(directory)
    assert set(before) == {"campaign.json"}
    _poison_month_adapter(monkeypatch, "m1")
    campaign = Campaign(directory)
    with pytest.raises(ModelHealthError, match="campaign.json still ends at no done month") as error:
        campaign.run_month("m1", month_files["m1"])
    assert error.value.limits == {"max_perplexity_ratio": 1.5, "max_kl_to_base": 10.0}
    assert snapshot(directory) == before
    assert campaign.months == [] and campaign.evaluations == {}  # the object forgot the month too
    monkeypatch.undo()
    assert campaign.run_month("m1", month_files["m1"])["status"] == "done"
    assert Campaign(directory).done_months == ["m1"]


def test_a_month_refused_in_training_leaves_no_trace(one_month_campaign, month_files, tmp_path, monkeypatch):
    directory = copy_of(one_month_campaign, tmp_path)
    before = snapshot(directory)
    _poison_dpo_loss(monkeypatch, lambda loss: loss * float("inf"))
    with pytest.raises(ModelHealthError, match=r"training loss is (inf|nan).*Nothing of month 'm2' was kept"):
        Campaign(directory).run_month("m2", month_files["m2"])
    assert snapshot(directory) == before


def test_the_limits_can_be_set_for_one_month_from_the_cli(one_month_campaign, month_files, tmp_path, capsys):
    directory = copy_of(one_month_campaign, tmp_path)
    before = snapshot(directory)
    # a healthy month moves the tiny model's KL to the base by ~1e-6 nats: a limit below that refuses it
    args = ["run-month", "m2", "--campaign_dir", directory, "--data", month_files["m2"]]
    assert cli(*args, "--max_kl_to_base", "1e-12") == 2
    assert "(limit: max_kl_to_base=1e-12)" in capsys.readouterr().err
    assert snapshot(directory) == before
    # and a healthy month moves its perplexity by ~0.1 %: a ratio limit of 1 refuses it
    assert cli(*args, "--max_perplexity_ratio", "1.0") == 2
    message = capsys.readouterr().err
    assert "x month 0's 80.9" in message and "(limit: max_perplexity_ratio=1.0)" in message
    assert "rerun the month with a higher --max_perplexity_ratio" in message
    assert snapshot(directory) == before
    assert cli(*args, "--max_kl_to_base", "1e-12", "--health_check", "false") == 0
    assert "health" not in Campaign(directory).month("m2")


class _Killed(Exception):
    pass


class _KillAfterStep3(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise _Killed


def test_a_refused_resumed_month_is_removed(one_month_campaign, month_files, tmp_path, monkeypatch):
    """A month interrupted earlier (checkpoint on disk, status "training") and refused when rerun: the campaign is
    left without it, so the rerun after the fix trains it from scratch instead of resuming broken checkpoints."""
    directory = copy_of(one_month_campaign, tmp_path)
    before = snapshot(directory)
    with pytest.raises(_Killed):
        Campaign(directory).run_month("m2", month_files["m2"], callbacks=[_KillAfterStep3()])
    assert (directory / "runs" / "m2" / "checkpoint-2").is_dir() and Campaign(directory).month("m2") is not None
    _poison_month_adapter(monkeypatch, "m2")
    with pytest.raises(ModelHealthError, match="Nothing of month 'm2' was kept"):
        Campaign(directory).run_month("m2")
    assert snapshot(directory) == before
    monkeypatch.undo()
    assert Campaign(directory).run_month("m2", month_files["m2"])["training"]["steps"] == 4
