"""The recommended retention keeps an earlier month where plain DPO loses it: two interfering months on the bundled
SmolLM2-135M-Instruct, judged by what the model generates.

Month 1 (`capitals`) teaches a bare one-word answer to "What is the capital of X?"; month 2 (`chatty_currency`) teaches
the reverse on a neighbouring question, a friendly full answer to "What currency does X use?". A month-2 update that
learns "be chatty" rather than "be chatty about currencies" undoes month 1.

Month 1 is trained once; month 2 is trained twice from that same month-1 model, with the same seed, steps, data and
adapter: with no retention term, and with `RECOMMENDED_RETENTION`. Each is then judged on held-out prompts:

- month-2 learning: share of held-out currency answers that open in the month's friendly style;
- month 1 kept: share of held-out capital answers still bare (the month-1 check);
- knowledge: multiple-choice accuracy on country facts no month is about (log-likelihood of the right option, so it
  does not depend on the answers' style).

The comparison is at matched month-2 learning: when the recommended arm learns less than the plain one, the plain
arm's month-2 update is scaled down with the retention dial (`peft_selective.retention.scaled_adapter`) to the
largest scale whose learning is not above the recommended arm's, which favours the plain arm (less learning, less
forgetting).

Opt-in (`PEFT_SELECTIVE_RETENTION_TEST=1`), because it does not pass yet (issue #13 is open) and takes about 10
minutes of 2 CPU cores (40 on a loaded machine). Measured on 2026-12-03 with these settings: month 1 learned (0.81
of held-out capital answers bare); month 2 then undid it without retention (0.00 bare) and with the recommended
retention kept 0.25, but neither arm learned month 2 by behaviour (0 of 16 currency answers in the friendly style,
the DPO loss at 0.2): the comparison at matched month-2 learning is not reached, and the test stops at its check that
the recommended arm learned month 2. It becomes a CI test once month 2 is learned in its budget.
"""

import os

import pytest
import torch
from peft import PeftModel
from transformers import set_seed

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import (
    RECOMMENDED_RETENTION,
    ContinualDPOConfig,
    ContinualDPOTrainer,
    RehearsalBuffer,
)
from peft_selective.demo.embedded import load_embedded_model
from peft_selective.demo.months import countries_in, knowledge_items, monthly_sequence
from peft_selective.evaluation import Check, generate_answers, multiple_choice_accuracy
from peft_selective.retention import scaled_adapter


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("PEFT_SELECTIVE_RETENTION_TEST"),
        reason="opt-in (PEFT_SELECTIVE_RETENTION_TEST=1): does not pass yet, see the module docstring",
    ),
]

MONTH_1, MONTH_2 = "capitals", "chatty_currency"
N_TRAIN, N_TEST, N_KNOWLEDGE = 32, 16, 48
STEPS, LEARNING_RATE = 12, 3e-4
#: the month-1 style: at most four words, no sentence after them (the protocol-2 benchmark's `capitals` check)
BARE = Check.from_spec({"name": "bare_answer", "regex": r"^\W*[^\s.!?]+(?:\s+[^\s.!?]+){0,3}\s*[.!]?\s*$"})
#: the month-2 style: the openers of `chatty_currency`'s chosen answers
FRIENDLY = Check.from_spec({"name": "friendly_opener", "regex": r"^\W*(?:Good question|Sure|Happy to help)\b"})
#: answers are judged on their opening words: a bare answer ends well within them, a chatty one does not
MAX_NEW_TOKENS = 12


def month_args(output_dir, adapter_name: str, **retention) -> ContinualDPOConfig:
    return ContinualDPOConfig(
        output_dir=str(output_dir / adapter_name),
        adapter_name=adapter_name,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=0.1,
        max_length=128,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # bf16 autocast on CPU is many times slower
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
        **retention,
    )


def share(check: Check, answers: list[str]) -> float:
    return sum(check.matches(answer) for answer in answers) / len(answers)


@pytest.fixture(scope="module")
def months():
    return dict(monthly_sequence((MONTH_1, MONTH_2), n_train=N_TRAIN, n_eval=N_TEST, seed=0))


def behaviour(model, tokenizer, months, knowledge) -> dict[str, float]:
    answers = {
        name: generate_answers(
            model, tokenizer, list(months[name]["test"]["prompt"]), max_new_tokens=MAX_NEW_TOKENS, disable_tqdm=True
        )
        for name in (MONTH_1, MONTH_2)
    }
    correct, _ = multiple_choice_accuracy(model, tokenizer, knowledge)
    scores = {
        "month_1_kept": share(BARE, answers[MONTH_1]),
        "month_2_learning": share(FRIENDLY, answers[MONTH_2]),
        "knowledge": sum(correct) / len(correct),
    }
    print(scores, {name: answers[name][:2] for name in answers})  # shown when the test fails (or with -s)
    return scores


def test_recommended_retention_keeps_month_1_better_than_none_at_matched_month_2_learning(tmp_path, months):
    knowledge = knowledge_items(n=N_KNOWLEDGE, seed=0, exclude_countries=countries_in(list(months.values())))
    adapter = SelectiveMLPConfig(rank=16, alpha=32)

    base, tokenizer = load_embedded_model()
    buffer = RehearsalBuffer(tmp_path / "buffer")
    set_seed(0)
    trainer = ContinualDPOTrainer(
        base,
        args=month_args(tmp_path, "m1"),
        train_dataset=months[MONTH_1]["train"],
        processing_class=tokenizer,
        peft_config=adapter,
        rehearsal_buffer=buffer,
    )
    trainer.train()
    trainer.finish_month("m1")
    after_month_1 = behaviour(trainer.model, tokenizer, months, knowledge)
    assert after_month_1["month_1_kept"] >= 0.5, f"month 1 was not learned, nothing to keep: {after_month_1}"
    trainer.model.save_pretrained(tmp_path / "month1")
    del trainer, base

    def month_2(retention: dict) -> tuple[PeftModel, dict[str, float]]:
        base, tokenizer = load_embedded_model()
        model = PeftModel.from_pretrained(base, tmp_path / "month1" / "m1", adapter_name="m1")
        set_seed(0)
        trainer = ContinualDPOTrainer(
            model,
            args=month_args(tmp_path, "m2", **retention),
            train_dataset=months[MONTH_2]["train"],
            processing_class=tokenizer,
            peft_config=adapter,
            rehearsal_buffer=buffer if retention.get("rehearsal_ratio") else None,
        )
        trainer.train()
        return trainer.model.eval(), behaviour(trainer.model, tokenizer, months, knowledge)

    recommended_model, recommended = month_2(RECOMMENDED_RETENTION)
    del recommended_model
    plain_model, plain = month_2({})
    # the months interfere: without retention month 2 undoes month 1 (else this test would show nothing)
    assert plain["month_1_kept"] < after_month_1["month_1_kept"] - 0.25, (after_month_1, plain)
    assert recommended["month_2_learning"] >= 0.5, f"the recommended arm did not learn month 2: {recommended}"

    scale, matched = 1.0, plain
    for candidate in (0.75, 0.5, 0.25):
        if matched["month_2_learning"] <= recommended["month_2_learning"]:
            break
        with scaled_adapter(plain_model, "m2", candidate), torch.no_grad():
            scale, matched = candidate, behaviour(plain_model, tokenizer, months, knowledge)
    assert matched["month_2_learning"] <= recommended["month_2_learning"], (recommended, matched, scale)

    report = f"after month 1 {after_month_1}; recommended {recommended}; plain at scale {scale} {matched}"
    assert recommended["month_1_kept"] > matched["month_1_kept"], report
    assert recommended["knowledge"] >= matched["knowledge"], report
