"""The selective methods on the bundled real model (SmolLM2-135M-Instruct, Llama architecture, 30 blocks)."""

import pytest
import torch
from peft import get_peft_model

from peft_selective import SAProjConfig, SelectiveMLPConfig


pytestmark = pytest.mark.slow

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30


@pytest.fixture(scope="module")
def smollm2():
    from peft_selective.demo.embedded import load_embedded_model

    return load_embedded_model()


@pytest.mark.parametrize(
    "config, expected_params, expected_suffixes",
    [
        (SelectiveMLPConfig(), LAYERS * 2 * HIDDEN * INTERMEDIATE, {"mlp.gate_proj", "mlp.up_proj"}),
        (
            SAProjConfig(),
            LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV),
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
        ),
    ],
    ids=["selective_mlp", "saproj"],
)
def test_real_model_trains_only_the_preset_and_keeps_base_recoverable(
    smollm2, config, expected_params, expected_suffixes
):
    model, tokenizer = smollm2
    batch = tokenizer(
        ["The capital of France is Paris.", "The capital of Peru is Lima."], return_tensors="pt", padding=True
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = get_peft_model(model, config)
    try:
        trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in trainable.values()) == expected_params
        assert {
            n.split(".layers.")[1].split(".", 1)[1].rsplit(".selective_delta_", 1)[0] for n in trainable
        } == expected_suffixes
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4)
        peft_model.train()
        losses = []
        for _ in range(3):
            loss = peft_model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        peft_model.eval()
        with torch.no_grad():
            adapted = peft_model(**batch).logits
            with peft_model.disable_adapter():
                assert torch.equal(peft_model(**batch).logits, base_logits)
            peft_model.merge_adapter()
            torch.testing.assert_close(peft_model(**batch).logits, adapted, atol=1e-4, rtol=0)
            peft_model.unmerge_adapter()
    finally:
        # give the shared base model back untouched for the next test
        peft_model.unload()
    with torch.no_grad():
        # merge + unmerge is W + ΔW - ΔW in float: equal up to rounding, as with LoRA
        torch.testing.assert_close(model(**batch).logits, base_logits, atol=1e-4, rtol=0)


def test_continual_dpo_two_months_on_the_4bit_bundled_model(tmp_path):
    """The whole continual path on the real model and its chat template, 4-bit: month 2 stacks on month 1 with
    rehearsal, the anchor KL and EWC (one step each, batch 2: only that it runs and logs, not what it learns)."""
    pytest.importorskip("bitsandbytes")
    from peft_selective.continual import ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer
    from peft_selective.demo.embedded import load_embedded_model
    from peft_selective.demo.months import concise_capitals_month, json_currency_month

    model, tokenizer = load_embedded_model(quantization="4bit")
    buffer = RehearsalBuffer(tmp_path / "buffer")
    common = dict(
        max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, max_length=96, report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True,
        fisher_dir=str(tmp_path / "fisher"), fisher_num_examples=2,
    )  # fmt: skip
    first = ContinualDPOTrainer(
        model,
        args=ContinualDPOConfig(str(tmp_path / "m1"), adapter_name="m1", **common),
        train_dataset=concise_capitals_month(n_train=4, n_eval=2)["train"],
        processing_class=tokenizer,
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    first.train()
    first.finish_month("m1")
    second = ContinualDPOTrainer(
        first.model,
        args=ContinualDPOConfig(
            str(tmp_path / "m2"),
            adapter_name="m2",
            rehearsal_ratio=0.5,
            kl_coef=0.5,
            kl_anchor_max_new_tokens=2,
            kl_max_general_anchors=2,
            kl_max_rehearsal_anchors=2,
            ewc_coef=1.0,
            **common,
        ),  # fmt: skip
        train_dataset=json_currency_month(n_train=4, n_eval=2)["train"],
        processing_class=tokenizer,
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
    )
    second.train()
    logged = {key for entry in second.state.log_history for key in entry}
    assert {"retention/kl", "retention/ewc", "rehearsal/fraction"} <= logged
    assert second.previous_adapters == ["m1"]
    losses = [entry["loss"] for entry in second.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
