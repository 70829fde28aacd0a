"""ContinualDPOTrainer on a tiny Llama: stacked monthly adapters, the month t−1 reference, rehearsal, the anchor KL,
EWC, data checks, 4-bit bases and a two-process DDP run."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, PeftModel
from testing_utils import (
    SCRIPTS_DIR,
    WORDS,
    continual_config,
    preference_month,
    tiny_chat_llama,
    train_month_1,
    word_chat_tokenizer,
)

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import (
    AnchorSet,
    ContinualDPOConfig,
    ContinualDPOTrainer,
    FisherState,
    PreferenceDataError,
    PreviousMonthReference,
    RehearsalBuffer,
    active_adapters,
    anchor_kl,
    ewc_penalty,
)
from peft_selective.continual.ewc import estimate_fisher


def month_2(model, tmp_path, peft_config=None, buffer=None, callbacks=(), **kwargs) -> ContinualDPOTrainer:
    """Month "m2" ("good" over "bad") on top of `model` (which holds m1)."""
    return ContinualDPOTrainer(
        model,
        args=continual_config(tmp_path, "m2", **kwargs),
        train_dataset=preference_month("good", "bad"),
        processing_class=word_chat_tokenizer(),
        peft_config=peft_config or SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
        callbacks=list(callbacks),
    )


def of(adapter: str, name: str) -> bool:
    """Whether parameter `name` belongs to `adapter` (`...selective_delta_A.m2` for ours, `...lora_A.m2.weight` for LoRA)."""
    return name.endswith(f".{adapter}") or f".{adapter}." in name


def logged_keys(trainer) -> set[str]:
    return {key for entry in trainer.state.log_history for key in entry}


# ------------------------------------------------------------------------------------------------ two months
def test_month_2_logs_every_retention_term(tmp_path):
    first = train_month_1(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    summary = first.finish_month("m1")
    assert summary["rehearsal_rows"] == 12 and summary["fisher_months"] == ["m1"]
    second = month_2(
        first.model,
        tmp_path,
        buffer=first.rehearsal_buffer,
        rehearsal_ratio=0.25,
        rehearsal_nll_coef=0.5,
        kl_coef=0.5,
        kl_anchor_max_new_tokens=3,
        ewc_coef=1.0,
        fisher_dir=str(tmp_path / "fisher"),
        max_steps=4,
    )
    m1_before = {n: p.detach().clone() for n, p in second.model.named_parameters() if of("m1", n)}
    second.train()
    keys = logged_keys(second)
    for key in ("retention/kl", "retention/ewc", "retention/rehearsal_nll", "rehearsal/fraction", "rehearsal/rows"):
        assert key in keys, key
    # EWC is exactly zero at the first step (the new adapter starts at the month-1 optimum), then positive
    ewc = [entry["retention/ewc"] for entry in second.state.log_history if "retention/ewc" in entry]
    assert ewc[0] == 0.0 and ewc[-1] > 0.0
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in second.state.log_history if "loss" in entry)
    # month 1 stays frozen, month 2 trained
    assert all(torch.equal(p.detach(), m1_before[n]) for n, p in second.model.named_parameters() if of("m1", n))
    assert any(p.requires_grad for n, p in second.model.named_parameters() if of("m2", n))
    assert second.finish_month("m2")["fisher_months"] == ["m1", "m2"]
    assert second.rehearsal_buffer.months == ["m1", "m2"]


def test_mixed_dataset_holds_the_requested_fraction_of_buffer_rows(tmp_path):
    buffer = RehearsalBuffer(tmp_path / "buffer")
    buffer.add_month("m1", preference_month("yes", "no", n=40), capacity_per_month=40)
    trainer = ContinualDPOTrainer(
        tiny_chat_llama(),
        args=continual_config(tmp_path, "m2", rehearsal_ratio=0.2),
        train_dataset=preference_month("good", "bad", n=40, offset=3),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    flags = trainer.train_dataset["is_rehearsal"]
    assert len(flags) == 50 and sum(flags) == 10  # 10 of 50 rows = 0.2
    assert trainer.rehearsal_summary == {"new": 40, "rehearsal:m1": 10}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(flags))])
    assert batch["is_rehearsal"].sum() == 10


def test_rehearsal_ratio_without_a_buffer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="rehearsal_buffer"):
        ContinualDPOTrainer(
            tiny_chat_llama(),
            args=continual_config(tmp_path, "m1", rehearsal_ratio=0.3),
            train_dataset=preference_month("yes", "no"),
            processing_class=word_chat_tokenizer(),
            peft_config=SelectiveMLPConfig(rank=4),
        )


# ------------------------------------------------------------------------------------------------ reference
def _sequence_logps(model, batch) -> torch.Tensor:
    """Summed completion log-probs, computed independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.mark.parametrize(
    "peft_config",
    [SelectiveMLPConfig(rank=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])],
    ids=["selective_mlp", "lora"],
)
@pytest.mark.parametrize("precompute", [False, True], ids=["inline", "precomputed"])
def test_reference_log_probs_are_those_of_the_previous_month_model(tmp_path, peft_config, precompute):
    first = train_month_1(tmp_path, peft_config=copy.deepcopy(peft_config))
    # The month-1 model on its own: m1 saved, loaded onto a fresh base and merged into a plain model. (Not a deepcopy:
    # TRL's fused-head patch closes over the original model's forward, so a deepcopy would still run the original.)
    first.model.save_pretrained(tmp_path / "adapters")
    month_1_model = (
        PeftModel.from_pretrained(tiny_chat_llama(), tmp_path / "adapters" / "m1").merge_and_unload().eval()
    )
    bare_base = tiny_chat_llama().eval()
    second = month_2(first.model, tmp_path, copy.deepcopy(peft_config), precompute_ref_log_probs=precompute)
    assert second.previous_adapters == ["m1"]
    # give the new adapter a non-zero update, so "policy" and "reference" differ
    with torch.no_grad():
        for name, param in second.model.named_parameters():
            if of("m2", name):
                param.add_(0.5 * torch.randn_like(param))
    rows = [second.train_dataset[i] for i in range(4)]
    batch = second.data_collator(rows)
    expected = _sequence_logps(month_1_model, batch)
    chosen, rejected = second.compute_ref_log_probs(second.ref_model, batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-4, atol=1e-4)
    # the DPO loss uses that reference (computed inline, or read from the precomputed columns)
    policy_chosen, policy_rejected = _sequence_logps(second.model, batch).chunk(2)
    reference_chosen, reference_rejected = expected.chunk(2)
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    with torch.no_grad():
        loss = second.compute_loss(second.model, batch)
    torch.testing.assert_close(
        loss, -torch.nn.functional.logsigmoid(second.beta * margin).mean(), rtol=1e-4, atol=1e-5
    )
    if precompute:
        stored = torch.tensor([row["ref_chosen_logps"] for row in rows] + [row["ref_rejected_logps"] for row in rows])
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)
    # ... and neither the bare base nor the current policy
    assert not torch.allclose(_sequence_logps(bare_base, batch), expected, atol=1e-3)
    assert not torch.allclose(_sequence_logps(second.model, batch), expected, atol=1e-3)
    # the policy is unchanged by computing the reference: both adapters still active, m1 frozen, m2 trainable
    assert second.model.base_model.active_adapters == ["m1", "m2"]
    assert not any(p.requires_grad for n, p in second.model.named_parameters() if of("m1", n))
    assert all(p.requires_grad for n, p in second.model.named_parameters() if of("m2", n))


@pytest.mark.parametrize(
    "peft_config",
    [SelectiveMLPConfig(rank=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])],
    ids=["selective_mlp", "lora"],
)
def test_continuing_a_trained_adapter_uses_it_as_it_was_at_the_start_as_reference(tmp_path, peft_config):
    first = train_month_1(tmp_path, peft_config=copy.deepcopy(peft_config))
    first.model.save_pretrained(tmp_path / "adapters")
    # an adapter trained elsewhere (e.g. SFT), passed in a PeftModel with no new `peft_config`: keep training it
    model = PeftModel.from_pretrained(
        tiny_chat_llama(), tmp_path / "adapters" / "m1", adapter_name="m1", is_trainable=True
    )
    trainer = ContinualDPOTrainer(
        model,
        args=continual_config(tmp_path, "m1", max_steps=2),
        train_dataset=preference_month("good", "bad"),
        processing_class=word_chat_tokenizer(),
    )
    assert trainer.reference_adapters == ["ref"]
    assert trainer.model.base_model.active_adapters == ["m1"]
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if of("ref", n))
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if of("m1", n))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # at the start, the reference is the trained adapter itself (not the bare base): every reward is exactly 0
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    torch.testing.assert_close(
        torch.cat([chosen, rejected]), _sequence_logps(trainer.model, batch), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(
        _sequence_logps(tiny_chat_llama().eval(), batch), torch.cat([chosen, rejected]), atol=1e-3
    )
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, torch.tensor(0.6931472), rtol=1e-5, atol=1e-5)
    # training moves the adapter, not its frozen copy: the reference stays the start-of-month model
    start = _sequence_logps(trainer.model, batch)
    trainer.train()
    after = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    torch.testing.assert_close(after, start, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_sequence_logps(trainer.model, batch), start, atol=1e-4)


def test_a_new_adapter_that_does_not_start_at_zero_is_part_of_the_reference(tmp_path):
    first = train_month_1(tmp_path)
    second = month_2(first.model, tmp_path, SelectiveMLPConfig(rank=4, init_weights=False))
    assert second.reference_adapters == ["m1", "ref"]
    batch = second.data_collator([second.train_dataset[i] for i in range(4)])
    chosen, rejected = second.compute_ref_log_probs(second.ref_model, batch)
    torch.testing.assert_close(
        torch.cat([chosen, rejected]), _sequence_logps(second.model, batch), rtol=1e-5, atol=1e-5
    )


def test_active_adapters_restores_state_and_rejects_unknown_names(tmp_path):
    first = train_month_1(tmp_path)
    model = first.model
    model.add_adapter("m2", SelectiveMLPConfig(rank=4))
    model.base_model.set_adapter(["m1", "m2"])
    model.base_model.set_requires_grad(["m1"], requires_grad=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with active_adapters(model, ["m1"]):
        assert model.base_model.active_adapters == ["m1"]
    with active_adapters(model, []):
        pass
    assert model.base_model.active_adapters == ["m1", "m2"]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="not in the model"):
        with active_adapters(model, ["m9"]):
            pass


def test_month_adapter_name_clash_is_a_clear_error(tmp_path):
    first = train_month_1(tmp_path)
    with pytest.raises(ValueError, match="already has an adapter named 'm1'"):
        ContinualDPOTrainer(
            first.model,
            args=continual_config(tmp_path, "m1"),
            train_dataset=preference_month("good", "bad"),
            processing_class=word_chat_tokenizer(),
            peft_config=SelectiveMLPConfig(rank=4),
        )


def test_month_2_after_a_save_and_reload(tmp_path):
    """The campaign path: month 1's adapter saved, reloaded under its name onto a fresh base, month 2 on top."""
    first = train_month_1(tmp_path)
    first.model.save_pretrained(tmp_path / "adapters")
    reloaded = PeftModel.from_pretrained(tiny_chat_llama(), tmp_path / "adapters" / "m1", adapter_name="m1")
    second = month_2(reloaded, tmp_path)
    second.train()
    assert second.previous_adapters == ["m1"]


# ------------------------------------------------------------------------------------------------ EWC
def month_1_fisher_and_a_fresh_month_2(tmp_path):
    """Month 1 trained, its Fisher estimated on 4 chosen rows, and a fresh "m2" adapter stacked on it."""
    first = train_month_1(tmp_path)
    model = first.model
    batch = first.data_collator([first.train_dataset[i] for i in range(4)])
    half = {k: batch[k][:4] for k in ("input_ids", "attention_mask", "completion_mask")}
    state = estimate_fisher(model, [half], "m1", "m1", show_progress=False)
    model.add_adapter("m2", SelectiveMLPConfig(rank=4))
    model.base_model.set_adapter(["m1", "m2"])
    return model, state


def test_ewc_penalty_is_zero_at_the_previous_optimum_and_grows_with_distance(tmp_path):
    model, state = month_1_fisher_and_a_fresh_month_2(tmp_path)
    assert state.num_examples == 4 and all((f >= 0).all() and f.sum() > 0 for f in state.fisher.values())
    assert ewc_penalty(model, "m2", state).item() == 0.0  # a fresh adapter: the month-1 optimum
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters() if of("m2", n)}
    penalties = []
    for distance in (0.01, 0.02, 0.04):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in direction:
                    param.copy_(distance * direction[name])
        penalties.append(ewc_penalty(model, "m2", state).item())
    assert 0 < penalties[0] < penalties[1] < penalties[2]
    # ΔW = B A is bilinear: scaling both factors by 2 scales ΔW by 4 and the quadratic penalty by 16
    assert penalties[2] / penalties[1] == pytest.approx(16.0, rel=1e-3)
    # the gradient reaches the new adapter only
    ewc_penalty(model, "m2", state).backward()
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if of("m1", n))
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if of("m2", n))


def test_fisher_state_round_trip_and_corruption(tmp_path):
    state = FisherState({"model.layers.0.mlp.up_proj": torch.rand(4, 3)}, ["m1"], 8, "tiny")
    state.save(tmp_path / "fisher")
    loaded = FisherState.load(tmp_path / "fisher")
    assert loaded.months == ["m1"] and loaded.num_examples == 8 and loaded.base_model == "tiny"
    torch.testing.assert_close(loaded.fisher["model.layers.0.mlp.up_proj"], state.fisher["model.layers.0.mlp.up_proj"])
    merged = loaded.merged(FisherState({"model.layers.0.mlp.up_proj": torch.ones(4, 3)}, ["m2"], 4), decay=0.5)
    torch.testing.assert_close(
        merged.fisher["model.layers.0.mlp.up_proj"], 0.5 * state.fisher["model.layers.0.mlp.up_proj"] + 1
    )
    assert merged.months == ["m1", "m2"] and merged.num_examples == 12
    weights = json.loads((tmp_path / "fisher" / "fisher.json").read_text())["weights"]
    (tmp_path / "fisher" / weights).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupted"):
        FisherState.load(tmp_path / "fisher")
    with pytest.raises(FileNotFoundError, match="No Fisher state"):
        FisherState.load(tmp_path / "elsewhere")


def test_normalized_fisher_gives_the_same_penalty_without_a_copy_per_call(tmp_path):
    model, state = month_1_fisher_and_a_fresh_month_2(tmp_path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if of("m2", name):
                param.copy_(0.05 * torch.randn_like(param))
    normalized = state.normalized()
    assert normalized.mean == pytest.approx(1.0, rel=1e-5) and normalized.months == state.months
    assert all(t.data_ptr() != normalized.fisher[n].data_ptr() for n, t in state.fisher.items())  # state untouched
    expected = ewc_penalty(model, "m2", state).item()
    assert expected > 0
    assert ewc_penalty(model, "m2", normalized, fisher_mean=1.0).item() == pytest.approx(expected, rel=1e-5)
    half_precision = state.normalized(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half_precision.fisher.values())
    assert ewc_penalty(model, "m2", half_precision, fisher_mean=1.0).item() == pytest.approx(expected, rel=1e-2)
    in_place = state.normalized(in_place=True)  # the trainer's way: no second copy, the same values
    assert in_place is state and in_place.mean == pytest.approx(1.0, rel=1e-5)
    assert ewc_penalty(model, "m2", in_place, fisher_mean=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_the_trainer_holds_the_fisher_normalised_in_the_configured_dtype(tmp_path):
    first = train_month_1(tmp_path, fisher_dir=str(tmp_path / "fisher"))
    first.finish_month("m1")
    second = month_2(
        first.model,
        tmp_path,
        ewc_coef=1.0,
        fisher_dir=str(tmp_path / "fisher"),
        max_steps=2,
        ewc_fisher_dtype="bfloat16",
    )
    assert all(t.dtype == torch.bfloat16 for t in second.fisher.fisher.values())
    assert second.fisher.mean == pytest.approx(1.0, rel=1e-2)
    second.train()
    assert FisherState.load(tmp_path / "fisher").fisher[next(iter(second.fisher.fisher))].dtype == torch.float32
    with pytest.raises(ValueError, match="ewc_fisher_dtype"):
        continual_config(tmp_path, "m2", ewc_fisher_dtype="int8")


def test_ewc_with_a_fisher_of_another_model_is_a_clear_error(tmp_path):
    first = train_month_1(tmp_path)
    FisherState({"model.layers.0.mlp.up_proj": torch.rand(5, 5)}, ["m1"], 4, "other").save(tmp_path / "fisher")
    with pytest.raises(ValueError, match="does not fit this model"):
        month_2(first.model, tmp_path, ewc_coef=1.0, fisher_dir=str(tmp_path / "fisher"))


# ------------------------------------------------------------------------------------------------ anchor KL
def test_anchor_kl_is_zero_before_training_and_positive_after(tmp_path):
    first = train_month_1(tmp_path)
    model = first.model
    model.add_adapter("m2", SelectiveMLPConfig(rank=4))
    model.base_model.set_adapter(["m1", "m2"])
    reference = PreviousMonthReference(model, ["m1"])
    anchors = AnchorSet(["question red", "answer blue green"], word_chat_tokenizer(), max_length=16)
    anchors.add_continuations(reference, max_new_tokens=3, show_progress=False)
    assert all(len(ids) > start + 1 for ids, start in zip(anchors.sequences, anchors.score_from))
    import random

    batch = anchors.sample(4, random.Random(0), torch.device("cpu"))
    assert batch.score_mask.sum(-1).min() >= 1 and (batch.score_mask <= batch.attention_mask).all()
    for direction in ("forward", "reverse"):
        assert anchor_kl(model, reference, batch, direction).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if of("m2", name):
                param.add_(0.5 * torch.randn_like(param))
    kl = anchor_kl(model, reference, batch, "forward")
    assert kl.item() > 1e-4
    kl.backward()
    assert any(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if of("m2", n))


# ------------------------------------------------------------------------------------------------ data checks
@pytest.mark.parametrize(
    "rows, message",
    [
        ({"prompt": ["a"], "answer": ["b"]}, "no 'chosen' or 'rejected' column"),
        (
            {"prompt": ["q", "q"], "chosen": ["yes", "  "], "rejected": ["no", "no"]},
            "row 1: 'chosen' is an empty string",
        ),
        (
            {"prompt": ["q", "q"], "chosen": ["yes", "no"], "rejected": ["no", "no"]},
            "row 1: 'chosen' and 'rejected' are identical",
        ),
        ({"prompt": [], "chosen": [], "rejected": []}, "is empty"),
    ],
    ids=["missing-column", "empty-string", "identical", "empty-dataset"],
)
def test_malformed_preference_data_names_the_row(tmp_path, rows, message):
    with pytest.raises(PreferenceDataError, match=message):
        ContinualDPOTrainer(
            tiny_chat_llama(),
            args=continual_config(tmp_path, "m1"),
            train_dataset=Dataset.from_dict(rows),
            processing_class=word_chat_tokenizer(),
            peft_config=SelectiveMLPConfig(rank=4),
        )


def test_missing_values_and_empty_messages_name_the_row():
    from peft_selective.continual import validate_preference_dataset

    plain = Dataset.from_dict({"prompt": ["q", "q", "q"], "chosen": ["a", "b", "c"], "rejected": ["x", "y", None]})
    with pytest.raises(PreferenceDataError, match=r"row 2: 'rejected' is missing \(None\)"):
        validate_preference_dataset(plain)
    chats = preference_month("yes", "no", n=3).to_list()
    chats[1]["chosen"] = [{"role": "assistant", "content": ""}]
    with pytest.raises(PreferenceDataError, match="row 1: 'chosen' has a 'assistant' message with empty content"):
        validate_preference_dataset(Dataset.from_list(chats), "eval")


def _tool_call_preferences(n: int = 8) -> Dataset:
    """TRL's tool-calling preference format: the chosen answer calls a tool (assistant message with `tool_calls` and
    no `content`), gets its result (a `tool` message) and answers; a `tools` column holds the JSON schemas."""
    call = {"type": "function", "function": {"name": "capital", "arguments": {"country": "france"}}}
    tool = {
        "type": "function",
        "function": {
            "name": "capital",
            "parameters": {"type": "object", "properties": {"country": {"type": "string"}}},
        },
    }
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what is the capital of france {WORDS[i % 10]}"}],
            "chosen": [
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": "capital", "content": "paris"},
                {"role": "assistant", "content": "paris"},
            ],
            "rejected": [{"role": "assistant", "content": "berlin"}],
            "tools": json.dumps([tool]),
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def test_tool_call_preference_data_is_accepted_as_trl_accepts_it(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from peft_selective.continual import validate_preference_dataset

    tokenizer = word_chat_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
        "{{ c['function']['name'] }} {% endfor %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    )
    data = _tool_call_preferences()
    assert validate_preference_dataset(data) == len(data)
    plain_args = DPOConfig(
        output_dir=str(tmp_path / "plain"), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    DPOTrainer(
        tiny_chat_llama(), tiny_chat_llama(), args=plain_args, train_dataset=data, processing_class=tokenizer
    ).train()
    trainer = ContinualDPOTrainer(
        tiny_chat_llama(),
        args=continual_config(tmp_path, "m1", max_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=SelectiveMLPConfig(rank=4),
    )
    trainer.train()
    # a message with neither content nor tool calls is still an error, naming the row
    broken = data.to_list()
    broken[3]["chosen"] = [{"role": "assistant"}]
    with pytest.raises(
        PreferenceDataError, match="row 3: 'chosen' has a 'assistant' message with (empty content|neither)"
    ):
        validate_preference_dataset(Dataset.from_list(broken))


def test_prompts_longer_than_max_length_are_an_error_or_a_logged_drop(tmp_path, caplog):
    data = preference_month("yes", "no", n=8)
    long_prompt = [{"role": "user", "content": " ".join(["red"] * 40)}]
    data = Dataset.from_list([row if i != 5 else {**row, "prompt": long_prompt} for i, row in enumerate(data)])
    kwargs = dict(train_dataset=data, processing_class=word_chat_tokenizer(), peft_config=SelectiveMLPConfig(rank=4))
    with pytest.raises(PreferenceDataError, match="rows 5. Raise `max_length`"):
        ContinualDPOTrainer(tiny_chat_llama(), args=continual_config(tmp_path, "m1", max_length=20), **kwargs)
    with caplog.at_level(logging.WARNING, logger="peft_selective.continual.trainer"):
        trainer = ContinualDPOTrainer(
            tiny_chat_llama(), args=continual_config(tmp_path, "m1", max_length=20, drop_long_prompts=True), **kwargs
        )
    assert len(trainer.train_dataset) == 7
    assert "Dropped 1 of 8 rows" in caplog.text


# ------------------------------------------------------------------------------------------------ bases
def test_two_months_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = tmp_path / "base"
    # Shapes bitsandbytes' CPU repacking accepts (out_features % 32 == 0, in_features % 64 == 0; k/v_proj: 2 heads of
    # 16): on an AVX512-BF16 CPU, were the repacking back (see test_quantization.py), month 2 would stop learning
    # after its anchor generation instead of failing with a shape error inside bitsandbytes.
    tiny_chat_llama(seed=0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    first = train_month_1(tmp_path, base=base, fisher_dir=str(tmp_path / "fisher"))
    first.finish_month("m1")
    second = month_2(
        first.model,
        tmp_path,
        buffer=first.rehearsal_buffer,
        kl_coef=0.5,
        kl_anchor_max_new_tokens=2,
        ewc_coef=1.0,
        fisher_dir=str(tmp_path / "fisher"),
        rehearsal_ratio=0.25,
    )
    before = {n: p.detach().clone() for n, p in second.model.named_parameters() if of("m2", n)}
    second.train()
    assert {"retention/kl", "retention/ewc"} <= logged_keys(second)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in second.model.named_parameters() if n in before)


def test_full_fine_tuning_with_kl_uses_the_given_reference(tmp_path):
    model = tiny_chat_llama()
    trainer = ContinualDPOTrainer(
        model,
        ref_model=tiny_chat_llama(),
        args=continual_config(tmp_path, "full", kl_coef=0.5, kl_anchor_max_new_tokens=2, max_steps=2),
        train_dataset=preference_month("yes", "no"),
        processing_class=word_chat_tokenizer(),
    )
    trainer.train()
    assert "retention/kl" in logged_keys(trainer)
    with pytest.raises(ValueError, match="EWC applies to a month's adapter"):
        ContinualDPOTrainer(
            tiny_chat_llama(),
            ref_model=tiny_chat_llama(),
            args=continual_config(tmp_path, "full", ewc_coef=1.0, fisher_dir=str(tmp_path / "f")),
            train_dataset=preference_month("yes", "no"),
            processing_class=word_chat_tokenizer(),
        )


# ------------------------------------------------------------------------------------------------ DDP
def test_two_process_ddp_run_agrees_on_the_loss(tmp_path):
    script = SCRIPTS_DIR / "continual_dpo_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    histories = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    losses = [[entry["loss"] for entry in history if "loss" in entry] for history in histories]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert all(any("retention/kl" in entry for entry in history) for history in histories)


# ------------------------------------------------------------------------------------------------ resume
class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("stored_reference", [False, True], ids=["previous_month", "own_month"])
def test_resuming_month_2_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, stored_reference):
    def run(name: str, callbacks=()):
        first = train_month_1(tmp_path / name)
        if stored_reference:  # the buffer rows carry their month-1 reference log-probs
            first.finish_month("m1", overwrite=True)
            buffer = first.rehearsal_buffer
        else:
            buffer = _buffer_with_month_1(tmp_path / name)
        options = dict(max_steps=4, save_strategy="steps", save_steps=2, kl_coef=0.5, kl_anchor_max_new_tokens=2)
        return month_2(
            first.model, tmp_path / name, buffer=buffer, callbacks=callbacks, rehearsal_ratio=0.25, **options
        )

    straight = run("straight")
    assert straight.own_reference_rows == (4 if stored_reference else 0)
    straight.train()
    interrupted = run("interrupted", callbacks=[_StopAt(2)])
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = run("interrupted")  # a fresh process would rebuild everything the same way
    resumed.args.output_dir = interrupted.args.output_dir
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    final = {n: p for n, p in resumed.model.named_parameters() if of("m2", n)}
    for name, param in straight.model.named_parameters():
        if of("m2", name):
            torch.testing.assert_close(final[name], param, rtol=1e-5, atol=1e-6)
    assert resumed.model.base_model.active_adapters == ["m1", "m2"]
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters() if of("m1", n))


def _buffer_with_month_1(directory: Path) -> RehearsalBuffer:
    buffer = RehearsalBuffer(directory / "buffer")
    if "m1" not in buffer:
        buffer.add_month("m1", preference_month("yes", "no"), capacity_per_month=12)
    return buffer


# ------------------------------------------------------------------------------------------------ rehearsal reference
def _month_1_with_stored_reference(tmp_path):
    """Month 1 trained and finished (its buffer rows stored with their month-1 reference log-probs), the month-1 model
    as a plain model, and the bare base."""
    first = train_month_1(tmp_path, max_steps=12, learning_rate=5e-2)  # long enough to learn visible margins
    summary = first.finish_month("m1")
    assert summary["rehearsal_rows"] == 12 and summary["rehearsal_reference_rows"] == 12
    first.model.save_pretrained(tmp_path / "adapters")
    month_1_model = (
        PeftModel.from_pretrained(tiny_chat_llama(), tmp_path / "adapters" / "m1").merge_and_unload().eval()
    )
    return first, month_1_model, tiny_chat_llama().eval()


def _rows_where(trainer, rehearsed: bool) -> list[dict]:
    return [row for row in trainer.train_dataset if bool(row["is_rehearsal"]) == rehearsed]


def test_stored_reference_log_probs_are_trls_of_the_month_1_reference(tmp_path):
    first, month_1_model, bare_base = _month_1_with_stored_reference(tmp_path)
    buffer = first.rehearsal_buffer
    info = buffer.month_info("m1")
    assert info.reference_logps == 12 and "adapters []" in info.reference
    rows = buffer.rows("m1")
    assert RehearsalBuffer(tmp_path / "buffer").rows("m1") == rows  # on disk, checksummed
    # TRL's reference log-probs of the month-1 reference (the bare base: month 1 started from it) on the same rows,
    # collated in the same batches: equal bit for bit
    tokenized = first._prepare_dataset(
        Dataset.from_list([{k: v for k, v in row.items() if k not in ("month", "reference_logps")} for row in rows]),
        first.processing_class,
        first.args,
        "check",
    )
    for start in (0, 4, 8):
        batch = first.data_collator.collator([tokenized[i] for i in range(start, start + 4)])
        chosen, rejected = first.compute_ref_log_probs(first.ref_model, batch)
        stored = rows[start : start + 4]
        assert torch.equal(chosen, torch.tensor([row["reference_logps"]["chosen"] for row in stored]))
        assert torch.equal(rejected, torch.tensor([row["reference_logps"]["rejected"] for row in stored]))
        # ... which are the bare base's (computed independently of TRL), not the month-1 model's
        expected = _sequence_logps(bare_base, batch)
        torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(_sequence_logps(month_1_model, batch), expected, atol=1e-3)


def _recomputed_reference_logps(trainer, month: str) -> torch.Tensor:
    """The month's buffer rows' reference log-probs computed afresh (nothing taken from the training), (rows, 2)."""
    values = trainer._reference_logps_of_rows(trainer.rehearsal_buffer.rows(month))
    return torch.tensor([[value["chosen"], value["rejected"]] for value in values])


def _stored_reference_logps(trainer, month: str) -> torch.Tensor:
    rows = trainer.rehearsal_buffer.rows(month)
    return torch.tensor([[row["reference_logps"]["chosen"], row["reference_logps"]["rejected"]] for row in rows])


@pytest.mark.parametrize("precompute", [False, True], ids=["inline", "precomputed"])
def test_finish_month_takes_the_reference_log_probs_the_training_computed(tmp_path, caplog, precompute):
    # 3 steps x 4 rows of a 12-row month: every row is seen once, so finish_month computes none of them again; the
    # values are those it would compute (other batches, other padding: equal up to rounding)
    first = train_month_1(tmp_path, precompute_ref_log_probs=precompute)
    if not precompute:
        assert sorted(first._seen_reference_logps) == list(range(12))
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.trainer"):
        summary = first.finish_month("m1")
    assert summary["rehearsal_reference_rows"] == 12
    assert "Reference log-probs of 12 rehearsal rows taken from the training, 0 computed." in caplog.text
    torch.testing.assert_close(
        _stored_reference_logps(first, "m1"), _recomputed_reference_logps(first, "m1"), rtol=1e-5, atol=1e-4
    )


def test_finish_month_keeps_only_the_months_own_rows_reference_and_computes_the_unseen_ones(tmp_path, caplog):
    first = train_month_1(tmp_path)
    first.finish_month("m1")
    second = month_2(first.model, tmp_path, buffer=first.rehearsal_buffer, rehearsal_ratio=0.25, max_steps=2)
    with torch.no_grad():  # a non-zero update: the policy differs from the month's reference (the month-1 model)
        for name, param in second.model.named_parameters():
            if of("m2", name):
                param.add_(0.5 * torch.randn_like(param))
    second.train()
    # rehearsed rows (scored against month 1's reference) are not month 2's: never kept
    flags = second.train_dataset["is_rehearsal"]
    assert second._seen_reference_logps and all(not flags[index] for index in second._seen_reference_logps)
    seen = len(second._seen_reference_logps)
    assert seen < 12  # 2 steps x 4 rows, some of them rehearsed: the other rows are computed in finish_month
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.trainer"):
        second.finish_month("m2")
    assert (
        f"Reference log-probs of {seen} rehearsal rows taken from the training, {12 - seen} computed." in caplog.text
    )
    stored = _stored_reference_logps(second, "m2")
    torch.testing.assert_close(stored, _recomputed_reference_logps(second, "m2"), rtol=1e-5, atol=1e-4)
    # ... which are month 2's reference (the month-1 model), not the policy's
    rows = second.rehearsal_buffer.rows("m2")
    tokenized = second._prepare_dataset(
        Dataset.from_list([{k: v for k, v in row.items() if k not in ("month", "reference_logps")} for row in rows]),
        second.processing_class,
        second.args,
        "check",
    )
    batch = second.data_collator.collator([tokenized[i] for i in range(4)])
    policy = torch.stack(second.compute_ref_log_probs(second.model, batch), dim=1)
    assert not torch.allclose(stored[:4], policy, atol=1e-3)


@pytest.mark.parametrize("reference", ["own_month", "previous_month"])
def test_a_rehearsed_pair_starts_month_2_at_its_month_1_margin(tmp_path, reference):
    first, month_1_model, bare_base = _month_1_with_stored_reference(tmp_path)
    second = month_2(
        first.model, tmp_path, buffer=first.rehearsal_buffer, rehearsal_ratio=0.25, rehearsal_reference=reference
    )
    rehearsed = _rows_where(second, rehearsed=True)
    assert len(rehearsed) == 4
    assert second.own_reference_rows == (4 if reference == "own_month" else 0)
    for row in rehearsed:  # each rehearsed row alone: its DPO loss at step 0
        batch = second.data_collator([row])
        with torch.no_grad():
            loss = second.compute_loss(second.model, batch)
        if reference == "previous_month":
            torch.testing.assert_close(loss, torch.tensor(math.log(2)), rtol=0, atol=1e-6)
            continue
        # the margin month 1 gave the pair: month-1 model against month 1's reference (the bare base)
        policy_chosen, policy_rejected = _sequence_logps(month_1_model, batch).chunk(2)
        base_chosen, base_rejected = _sequence_logps(bare_base, batch).chunk(2)
        margin = (policy_chosen - base_chosen) - (policy_rejected - base_rejected)
        assert margin.item() > 0.5  # month 1 learned it
        expected = -torch.nn.functional.logsigmoid(second.beta * margin).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        assert loss.item() < math.log(2) - 1e-3


@pytest.mark.parametrize("precompute", [False, True], ids=["inline", "precomputed"])
def test_new_rows_keep_the_previous_month_model_as_reference(tmp_path, precompute):
    first, month_1_model, _ = _month_1_with_stored_reference(tmp_path)
    second = month_2(
        first.model, tmp_path, buffer=first.rehearsal_buffer, rehearsal_ratio=0.25, precompute_ref_log_probs=precompute
    )
    with torch.no_grad():  # a non-zero update, so that policy, month-1 model and base all differ
        for name, param in second.model.named_parameters():
            if of("m2", name):
                param.add_(0.5 * torch.randn_like(param))
    rows = _rows_where(second, rehearsed=True)[:2] + _rows_where(second, rehearsed=False)[:2]
    batch = second.data_collator(rows)
    own = ~torch.isnan(batch["rehearsal_ref_chosen_logps"])
    assert own.tolist() == [True, True, False, False]
    inputs = second._with_own_month_reference(
        {k: v for k, v in batch.items() if not k.startswith("rehearsal_ref") and k != "is_rehearsal"},
        batch["rehearsal_ref_chosen_logps"],
        batch["rehearsal_ref_rejected_logps"],
        own,
    )
    reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
    stored = torch.tensor([row["rehearsal_ref_chosen_logps"] for row in rows[:2]])
    assert torch.equal(inputs["ref_chosen_logps"][:2], stored)  # rehearsed: as stored
    month_1 = _sequence_logps(month_1_model, batch)
    new = torch.tensor([False, False, True, True] * 2)
    torch.testing.assert_close(reference[new], month_1[new], rtol=1e-4, atol=1e-4)  # new: the month-1 model
    # the loss uses exactly that reference for each row
    policy_chosen, policy_rejected = _sequence_logps(second.model, batch).chunk(2)
    margin = (policy_chosen - inputs["ref_chosen_logps"]) - (policy_rejected - inputs["ref_rejected_logps"])
    with torch.no_grad():
        loss = second.compute_loss(second.model, batch)
    torch.testing.assert_close(
        loss, -torch.nn.functional.logsigmoid(second.beta * margin).mean(), rtol=1e-4, atol=1e-5
    )


def test_an_old_format_buffer_loads_and_falls_back_to_the_previous_month_model(tmp_path, caplog):
    first = train_month_1(tmp_path)
    buffer = _buffer_with_month_1(tmp_path)  # rows added without reference log-probs, rewritten as format 1
    manifest_path = tmp_path / "buffer" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    for entry in manifest["months"]:
        del entry["reference_logps"], entry["reference"]
    manifest_path.write_text(json.dumps(manifest))
    buffer = RehearsalBuffer(tmp_path / "buffer")
    assert buffer.month_info("m1").reference_logps == 0 and len(buffer) == 12
    with caplog.at_level(logging.WARNING, logger="peft_selective.continual.trainer"):
        second = month_2(first.model, tmp_path, buffer=buffer, rehearsal_ratio=0.25)
    assert "4 rehearsed rows have no stored reference log-probs ({'rehearsal:m1': 4})" in caplog.text
    assert second.own_reference_rows == 0
    batch = second.data_collator(_rows_where(second, rehearsed=True))
    with torch.no_grad():
        loss = second.compute_loss(second.model, batch)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)), rtol=0, atol=1e-6)  # previous_month behaviour
    second.train()
    assert second.finish_month("m2")["rehearsal_reference_rows"] == 12
    assert json.loads(manifest_path.read_text())["format_version"] == 2  # migrated by the next change


def test_rows_that_tokenize_differently_fall_back_with_a_warning(tmp_path, caplog):
    first, _, _ = _month_1_with_stored_reference(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peft_selective.continual.trainer"):
        # rows of 3 prompt tokens and 1 completion token, cut to their last 3 tokens: other sequences than month 1's
        second = month_2(
            first.model,
            tmp_path,
            buffer=first.rehearsal_buffer,
            rehearsal_ratio=0.25,
            max_length=3,
            truncation_mode="keep_end",
        )
    assert "4 rehearsed rows ({'rehearsal:m1': 4}) tokenize differently" in caplog.text
    assert second.own_reference_rows == 0
    # the same options as month 1 (sequences shorter than max_length: nothing is cut): the stored values are used
    again = month_2(
        first.model,
        tmp_path,
        buffer=first.rehearsal_buffer,
        rehearsal_ratio=0.25,
        max_length=64,
        adapter_name="m2b",
        previous_adapters=["m1"],
    )
    assert again.own_reference_rows == 4


def test_sft_weight_adds_trls_sft_term(tmp_path):
    args = continual_config(tmp_path, "m1", sft_weight=0.5)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert ContinualDPOConfig(**{**args.to_dict(), "output_dir": str(tmp_path)}).loss_type == ["sigmoid", "sft"]
    assert continual_config(tmp_path, "m1", sft_weight=0.5, loss_type=["ipo"], loss_weights=[2.0]).loss_weights == [
        2.0,
        0.5,
    ]
    with pytest.raises(ValueError, match="already has it"):
        continual_config(tmp_path, "m1", sft_weight=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    with pytest.raises(ValueError, match="sft_weight"):
        continual_config(tmp_path, "m1", sft_weight=-1.0)

    def trainer(**kwargs):
        return ContinualDPOTrainer(
            tiny_chat_llama(),
            args=continual_config(tmp_path, "m1", max_steps=2, **kwargs),
            train_dataset=preference_month("yes", "no"),
            processing_class=word_chat_tokenizer(),
            peft_config=SelectiveMLPConfig(rank=4),
        )

    plain, with_sft = trainer(), trainer(sft_weight=0.5)
    batch = plain.data_collator([plain.train_dataset[i] for i in range(4)])
    plain.model.train(), with_sft.model.train()
    loss = plain.compute_loss(plain.model, batch)
    loss_sft = with_sft.compute_loss(with_sft.model, batch)
    nll = with_sft._retention_metrics["train"]["loss/sft"][-1]
    assert nll > 0 and "loss/sft" not in plain._retention_metrics["train"]
    torch.testing.assert_close(loss_sft.detach(), loss.detach() + 0.5 * nll, rtol=1e-5, atol=1e-5)
    with_sft.train()
    assert "loss/sft" in logged_keys(with_sft)


# ------------------------------------------------------------------------------------- retention rows scored apart
@pytest.mark.parametrize("sft_weight", [0.0, 1.0], ids=["dpo", "dpo+sft"])
def test_retention_rows_scored_apart_give_the_whole_batch_loss_and_gradient(tmp_path, sft_weight):
    """Rehearsed rows (month 1's long answers) scored in their own forward and the month's short rows in another:
    fewer padded positions, the same loss, gradient, rehearsal NLL and logged metrics as one padded forward."""
    first = train_month_1(tmp_path, train_dataset=preference_month("yes " * 7 + "yes", "no " * 7 + "no"), max_steps=2)
    first.finish_month("m1")
    second = month_2(
        first.model,
        tmp_path,
        buffer=first.rehearsal_buffer,
        rehearsal_ratio=0.25,
        sft_weight=sft_weight,
        rehearsal_nll_coef=0.5,
    )
    with torch.no_grad():  # a non-zero month-2 update, so that policy and references differ
        for name, param in second.model.named_parameters():
            if of("m2", name):
                param.add_(0.5 * torch.randn_like(param))
    batch = second.data_collator(_rows_where(second, rehearsed=True)[:2] + _rows_where(second, rehearsed=False)[:2])
    parts = second._scoring_parts(batch, (batch["is_rehearsal"], None))
    assert [part.tolist() for part in parts] == [[2, 3], [0, 1]]
    mask = batch["attention_mask"]
    from peft_selective.continual.trainer import _padded_positions

    assert sum(_padded_positions(mask, part) for part in parts) < mask.numel()

    def scored(apart: bool):
        second.args.score_retention_rows_apart = apart
        second.model.train()
        second.model.zero_grad()
        second._metrics["train"].clear()
        second._retention_metrics["train"].clear()
        loss = second.compute_loss(second.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in second.model.named_parameters() if p.requires_grad}
        logged = {**second._metrics["train"], **second._retention_metrics["train"]}
        return loss.detach(), grads, logged

    whole_loss, whole_grads, whole_logged = scored(False)
    apart_loss, apart_grads, apart_logged = scored(True)
    torch.testing.assert_close(apart_loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert whole_grads.keys() == apart_grads.keys() and whole_grads
    for name in whole_grads:
        torch.testing.assert_close(apart_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)
    # one value per metric for the step, as with one forward (token-averaged ones differ: they weigh pairs there)
    assert {key: len(values) for key, values in apart_logged.items() if key != "num_tokens"} == {
        key: len(values) for key, values in whole_logged.items() if key != "num_tokens"
    }
    for key in ("rewards/chosen", "rewards/margins", "logps/rejected", "retention/rehearsal_nll"):
        assert apart_logged[key] == pytest.approx(whole_logged[key], rel=1e-4, abs=1e-6), key
    if sft_weight:
        assert apart_logged["loss/sft"] == pytest.approx(whole_logged["loss/sft"], rel=1e-4)


def test_retention_rows_are_scored_with_the_batch_when_parts_would_not_be_exact(tmp_path):
    first = train_month_1(tmp_path)
    first.finish_month("m1")
    second = month_2(first.model, tmp_path, buffer=first.rehearsal_buffer, rehearsal_ratio=0.25, loss_type=["robust"])
    batch = second.data_collator(_rows_where(second, rehearsed=True)[:2] + _rows_where(second, rehearsed=False)[:2])
    assert second._scoring_parts(batch, (batch["is_rehearsal"], None)) is None  # not a mean over pairs
    second.loss_types = ["sigmoid"]
    assert second._scoring_parts(batch, (torch.zeros(4), None)) is None  # no retention row
    assert second._scoring_parts(batch, (torch.ones(4), None)) is None  # only retention rows
    # same-length rows (both months answer in one word): nothing to save
    assert second._scoring_parts(batch, (batch["is_rehearsal"], None)) is None
