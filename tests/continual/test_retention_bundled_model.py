"""The recommended retention keeps an earlier month where plain DPO loses it: two interfering months on the bundled
SmolLM2-135M-Instruct, judged by what the model generates (issue #13).

Month 1 (`capitals`) teaches a bare one-word answer to "What is the capital of X?"; month 2 (`currency`) teaches a JSON
object, `{"country": "X", "currency": "..."}`, for the neighbouring question "What currency does X use?". The months
interfere: without retention, month 2's format bleeds onto the capital questions, which the model then answers with
JSON objects too (`{"country": "San Marino", "capital": "San Marino"}`), and month 1's bare answers are gone.

Month 1 is trained once; month 2 is trained twice from that same month-1 model, with the same seed, steps, learning
rate, data and adapter: with no retention term, and with `RECOMMENDED_RETENTION` as the library defines it. Each is
then judged on held-out prompts (16 per month, countries no month trains on):

- month-2 learning: share of held-out currency answers that open as the month's JSON object (country, then currency);
- month 1 kept: share of held-out capital answers still bare (the `capitals` check: at most four words starting with a
  letter, so that neither a JSON object nor a run of symbols counts);
- knowledge: multiple-choice accuracy on 48 country facts no month is about (log-likelihood of the right option, so it
  does not depend on the answers' style).

The test asserts that month 1 was learned (at least half its answers bare), that both arms learned month 2 (gain of at
least 0.5 over the month-1 model), that the months interfere (the plain arm loses at least 0.25 of month 1), and that
at matched month-2 learning the recommended arm keeps month 1 better by at least 0.25 (4 of 16 answers) and loses at
most 2 of 48 knowledge questions more than the plain arm. Matching: when the recommended arm learns less than the plain
one, the plain arm's month-2 update is scaled down with the retention dial (`peft_selective.retention.scaled_adapter`)
to the largest of 0.75, 0.5, 0.25 whose learning is not above the recommended arm's, which favours the plain arm (less
learning, less forgetting). The measured numbers are printed as the test goes (on the terminal even when it passes).

The protocol (measured on this 2-core CPU, one torch thread, 12 month-1 steps of 4 pairs at lr 3e-4):

- `chatty_currency` (a friendly full answer, the reverse of month 1's preference) was the first month 2 tried, but
  plain DPO does not learn it by generation: the bare rejected answer is pushed down and the loss saturates while the
  greedy answers drift (0 of 16 friendly openers after 12 or 24 steps at 3e-4, "Hello, I'should've said, ..."; 9 of 16
  after 24 steps at 1e-3, mostly "Hello! I hope this message finds you well ...", knowledge 0.60 -> 0.42).
- `currency` is learned by both arms, with a sharp rise: share of answers opening as its JSON object after
  12/16/20/24/28/32 month-2 steps at 3e-4, plain 0.00/0.19/0.94/1.00/1.00/1.00, recommended
  0.00/0.06/0.13/1.00/1.00/1.00. 28 steps leave a margin past both rises. At 6e-4 both arms learn by step 12 (plain
  1.00, recommended 1.00) but the recommended arm's learning swings (0.75, 1.00, 0.38 at steps 8, 12, 16), so the
  slower rate is used.

Measured with this file on 2026-12-03 (2-core AMD EPYC, one torch thread), three runs with other jobs on the machine
(load average 1.7-2.3, 1.5-2.1 and 1.9-3.2), identical numbers: month 1 learned (0.81 of capital answers bare,
knowledge 0.71); month 2 learned by both arms (16 of 16 JSON answers); without retention month 1 was gone (0.00 bare:
every capital answer a JSON object) and knowledge fell to 0.48; with the recommended retention month 1 kept 0.69 bare
(some capital answers did turn into JSON) and knowledge 0.65. Matched at scale 1.0 (equal learning). The runs took
15, 13 and 14 minutes of wall time (12.2-12.7 minutes of CPU time; of the 13: month 1 and its check 2.7, the
recommended month 2 6.3, the plain one 3.9); 24 month-2 steps would save about 1.5 minutes but sit on the recommended
arm's rise.

What it does not show: one seed, one pair of months and one order; behaviour is judged by style, not by content (the
month-1 model often answers with the country's name, "Serbia.", and many JSON currencies are wrong, which the checks do
not see); learning is at its ceiling in both arms, so the matching by scale is not exercised; knowledge is the
multiple-choice log-likelihood, not greedy exact match; which of the five retention terms does the keeping is not
separated here (the committed ablation, `benchmarks/results/forgetting.md`, measures single terms on protocol 2).
"""

import time

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
from peft_selective.demo.months import MONTH_CHECKS, countries_in, knowledge_items, monthly_sequence
from peft_selective.evaluation import Check, generate_answers, multiple_choice_accuracy
from peft_selective.retention import scaled_adapter


pytestmark = pytest.mark.slow

MONTH_1, MONTH_2 = "capitals", "currency"
N_TRAIN, N_TEST, N_KNOWLEDGE = 32, 16, 48
MONTH_1_STEPS, MONTH_2_STEPS, LEARNING_RATE = 12, 28, 3e-4
#: month 1's style: the `capitals` check (at most four words, no sentence after them, starting with a letter: a JSON
#: object, `{"country": "Serbia", "capital": "Belgrade"}`, has four "words" but is not month 1's bare answer)
BARE = Check.from_spec(MONTH_CHECKS[MONTH_1]["checks"][0])
#: month 2's style: the JSON object of `currency`'s chosen answers, opened as they are (country, then currency); read
#: on the opening, so that an answer cut at `MAX_NEW_TOKENS` or with an extra key still counts
JSON_ANSWER = Check.from_spec(
    {"name": "json_answer", "regex": r'^\s*\{\s*"country"\s*:\s*"[^"]*"\s*,\s*"currency"\s*:'}
)
#: long enough for a month-2 answer to reach its "currency" key, and for a chatty capital answer to show it is not bare
MAX_NEW_TOKENS = 24

#: each arm's month-2 learning must exceed the month-1 model's by this much (half of the held-out currency answers)
LEARNED = 0.5
#: without retention, month 2 must take at least this much of month 1 away (else the months do not interfere)
INTERFERENCE = 0.25
#: at matched month-2 learning, the recommended arm keeps at least this much more of month 1 (4 of 16 answers)
KEPT_MARGIN = 0.25
#: and loses at most this much more multiple-choice knowledge than the plain arm (2 of 48 questions)
KNOWLEDGE_TOLERANCE = 2 / N_KNOWLEDGE


def month_args(output_dir, adapter_name: str, steps: int, **retention) -> ContinualDPOConfig:
    return ContinualDPOConfig(
        output_dir=str(output_dir / adapter_name),
        adapter_name=adapter_name,
        max_steps=steps,
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


def share(passes, answers: list[str]) -> float:
    return sum(passes(answer) for answer in answers) / len(answers)


@pytest.fixture(scope="module")
def months():
    return dict(monthly_sequence((MONTH_1, MONTH_2), n_train=N_TRAIN, n_eval=N_TEST, seed=0))


def test_recommended_retention_keeps_month_1_better_than_none_at_matched_month_2_learning(tmp_path, months, capsys):
    start = time.perf_counter()

    def show(line: str) -> None:  # on the terminal even when the test passes, so that CI logs hold the numbers
        with capsys.disabled():
            print(f"\n[retention test, {time.perf_counter() - start:.0f} s] {line}", flush=True)

    knowledge = knowledge_items(n=N_KNOWLEDGE, seed=0, exclude_countries=countries_in(list(months.values())))

    def behaviour(model, tokenizer, label: str) -> dict[str, float]:
        answers = {
            name: generate_answers(
                model,
                tokenizer,
                list(months[name]["test"]["prompt"]),
                max_new_tokens=MAX_NEW_TOKENS,
                disable_tqdm=True,
            )
            for name in (MONTH_1, MONTH_2)
        }
        correct, _ = multiple_choice_accuracy(model, tokenizer, knowledge)
        scores = {
            "month_1_kept": share(BARE.matches, answers[MONTH_1]),
            "month_2_learning": share(JSON_ANSWER.matches, answers[MONTH_2]),
            "knowledge": sum(correct) / len(correct),
        }
        show(f"{label}: {scores}; e.g. {answers[MONTH_1][:2]} {answers[MONTH_2][:2]}")
        return scores

    adapter = SelectiveMLPConfig(rank=16, alpha=32)
    base, tokenizer = load_embedded_model()
    buffer = RehearsalBuffer(tmp_path / "buffer")
    set_seed(0)
    trainer = ContinualDPOTrainer(
        base,
        args=month_args(tmp_path, "m1", MONTH_1_STEPS),
        train_dataset=months[MONTH_1]["train"],
        processing_class=tokenizer,
        peft_config=adapter,
        rehearsal_buffer=buffer,
    )
    trainer.train()
    trainer.finish_month("m1")
    after_month_1 = behaviour(trainer.model, tokenizer, "after month 1")
    assert after_month_1["month_1_kept"] >= 0.5, f"month 1 was not learned, nothing to keep: {after_month_1}"
    trainer.model.save_pretrained(tmp_path / "month1")
    del trainer, base

    def month_2(retention: dict, label: str) -> tuple[PeftModel, dict[str, float]]:
        base, tokenizer = load_embedded_model()
        model = PeftModel.from_pretrained(base, tmp_path / "month1" / "m1", adapter_name="m1")
        set_seed(0)
        trainer = ContinualDPOTrainer(
            model,
            args=month_args(tmp_path, "m2", MONTH_2_STEPS, **retention),
            train_dataset=months[MONTH_2]["train"],
            processing_class=tokenizer,
            peft_config=adapter,
            rehearsal_buffer=buffer if retention.get("rehearsal_ratio") else None,
        )
        trainer.train()
        return trainer.model.eval(), behaviour(trainer.model, tokenizer, label)

    recommended_model, recommended = month_2(RECOMMENDED_RETENTION, "month 2 with RECOMMENDED_RETENTION")
    del recommended_model
    plain_model, plain = month_2({}, "month 2 without retention")

    # both arms learned month 2 (else there is no learning to match), and the months interfere: without retention
    # month 2 takes month 1 away (else this test would show nothing)
    for arm, scores in (("recommended", recommended), ("plain", plain)):
        gain = scores["month_2_learning"] - after_month_1["month_2_learning"]
        assert gain >= LEARNED, f"the {arm} arm did not learn month 2: {scores}, after month 1 {after_month_1}"
    assert plain["month_1_kept"] <= after_month_1["month_1_kept"] - INTERFERENCE, (after_month_1, plain)

    # matched month-2 learning: the plain arm's update scaled down to the largest scale whose learning is not above
    # the recommended arm's (less learning, less forgetting: in the plain arm's favour)
    scale, matched = 1.0, plain
    for candidate in (0.75, 0.5, 0.25):
        if matched["month_2_learning"] <= recommended["month_2_learning"]:
            break
        with scaled_adapter(plain_model, "m2", candidate), torch.no_grad():
            scale, matched = (
                candidate,
                behaviour(plain_model, tokenizer, f"month 2 without retention, scale {candidate}"),
            )
    assert matched["month_2_learning"] <= recommended["month_2_learning"], (recommended, matched, scale)

    report = f"after month 1 {after_month_1}; recommended {recommended}; plain at scale {scale} {matched}"
    show(f"matched at the plain arm's scale {scale}: {report}")
    assert recommended["month_1_kept"] >= matched["month_1_kept"] + KEPT_MARGIN, report
    assert recommended["knowledge"] >= matched["knowledge"] - KNOWLEDGE_TOLERANCE, report
