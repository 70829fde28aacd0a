"""Retention where bleed happens: same-shape anchor prompts, on-policy refresh of the anchors' continuations and
boundary pairs (`kl_anchor_kinds`, `kl_anchor_refresh_steps`, `boundary_pairs` of `ContinualDPOConfig`)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from testing_utils import (
    EOS,
    continual_config,
    finish_boundary_answers,
    preference_month,
    tiny_chat_llama,
    word_chat_tokenizer,
)

from peft_selective import SelectiveMLPConfig
from peft_selective.continual import AnchorSet, ContinualDPOConfig, ContinualDPOTrainer, RehearsalBuffer
from peft_selective.continual.anchors import (
    SHAPE_ATTRIBUTES,
    greedy_continuations,
    shape_variant_prompts,
    shape_variants,
)
from peft_selective.continual.trainer import BOUNDARY_FLAG, whole_sentences
from peft_selective.utils.chat import encode_prompt


CAPITALS = [
    "What is the capital of Indonesia?",
    "What is the capital of Peru?",
    "Name the capital of France.",
    "What is the capital of Kenya?",
]


# ------------------------------------------------------------------------------------------------ the generator
def test_same_shape_variants_replace_the_template_word_and_keep_the_entity():
    variants = shape_variants(CAPITALS, max_prompts=12, seed=0)
    assert len(variants) == 12
    entities = ["Indonesia", "Peru", "France", "Kenya"]
    for variant in variants:
        assert variant.template == "capital" and variant.attribute in SHAPE_ATTRIBUTES
        assert "capital" not in variant.prompt.lower()
        assert variant.prompt == CAPITALS[variant.source].replace("capital", variant.attribute)
        assert entities[variant.source] in variant.prompt
    # the first ones cover every month prompt once, and no variant is repeated
    assert sorted(v.source for v in variants[:4]) == [0, 1, 2, 3]
    assert len({v.prompt for v in variants}) == 12
    assert "What is the population of Indonesia?" in shape_variant_prompts(CAPITALS, max_prompts=100, seed=0)


def test_same_shape_variants_are_deterministic_and_seeded():
    first = shape_variant_prompts(CAPITALS, max_prompts=8, seed=3)
    assert first == shape_variant_prompts(list(CAPITALS), max_prompts=8, seed=3)
    assert first != shape_variant_prompts(CAPITALS, max_prompts=8, seed=4)
    assert shape_variant_prompts(CAPITALS, max_prompts=0) == []
    # all of them: prompts x attributes
    assert len(shape_variant_prompts(CAPITALS, max_prompts=1000)) == len(CAPITALS) * len(SHAPE_ATTRIBUTES)


def test_a_multi_word_template_is_replaced_whole_and_never_by_itself():
    prompts = ["What is the largest city of Chile?", "What is the largest city of Spain?"]
    variants = shape_variants(prompts, max_prompts=100)
    assert {v.template for v in variants} == {"largest city"}
    assert all("largest" not in v.prompt and "city" not in v.prompt for v in variants)
    assert "What is the national dish of Chile?" in [v.prompt for v in variants]


def test_too_varied_prompts_give_no_variants_and_say_why(caplog):
    varied = ["Explain why the sky is blue.", "Write a haiku about the sea.", "How do bees make honey?"]
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.anchors"):
        assert shape_variant_prompts(varied) == []
    assert "too varied" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peft_selective.continual.anchors"):
        assert shape_variant_prompts(["What is the capital of Peru?"] * 3) == []
    assert "distinct" in caplog.text


def test_conversational_prompts_vary_the_last_user_message_only():
    prompts = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is the capital of {c}?"}]
        for c in ("Chile", "Spain", "Japan")
    ]
    variants = shape_variants(prompts, max_prompts=6, seed=1)
    assert len(variants) == 6
    for variant in variants:
        system, user = variant.prompt
        assert system == {"role": "system", "content": "Be brief."}
        assert user["role"] == "user" and "capital" not in user["content"]
        assert user["content"] == prompts[variant.source][1]["content"].replace("capital", variant.attribute)
    assert prompts[0][1]["content"] == "What is the capital of Chile?"  # the month's prompts are left untouched


def test_excluded_and_month_prompts_are_never_produced():
    prompts = CAPITALS + ["What is the population of Peru?"]  # "population" in 1 of 5: not a template word
    produced = shape_variant_prompts(prompts, max_prompts=1000, exclude=["What is the flag of Kenya?"])
    assert "What is the population of Peru?" not in produced
    assert "What is the flag of Kenya?" not in produced
    assert "What is the flag of Peru?" in produced


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kl_anchor_kinds=["general", "nearby"]), "among ['general', 'same_shape', 'earlier_months']"),
        (dict(kl_anchor_kinds=[]), "non-empty"),
        (dict(kl_anchor_kinds=["general", "general"]), "distinct"),
        (dict(kl_max_shape_anchors=-1), "kl_max_shape_anchors"),
        (dict(kl_anchor_refresh_steps=-1), "kl_anchor_refresh_steps"),
        (dict(kl_anchor_refresh_steps=2, kl_anchor_max_new_tokens=0), "kl_anchor_max_new_tokens > 0"),
        (dict(boundary_pairs=-2), "boundary_pairs"),
        (dict(boundary_max_new_tokens=0), "boundary_max_new_tokens"),
        (dict(anchor_generation_batch_size=0), "anchor_generation_batch_size"),
    ],
)
def test_bad_anchor_options_are_clear_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        continual_config(tmp_path, "m1", **options)


def test_anchor_option_defaults_keep_todays_behaviour(tmp_path):
    args = continual_config(tmp_path, "m1")
    assert args.kl_anchor_kinds == ["general", "earlier_months"]
    assert (args.kl_max_shape_anchors, args.kl_anchor_refresh_steps, args.boundary_pairs) == (64, 0, 0)
    assert args.boundary_max_new_tokens == 48
    assert continual_config(tmp_path, "m1", kl_anchor_kinds="general, same_shape").kl_anchor_kinds == [
        "general",
        "same_shape",
    ]
    assert ContinualDPOConfig(**{**args.to_dict(), "kl_anchor_kinds": ["same_shape"]}).kl_anchor_kinds == [
        "same_shape"
    ]


# ------------------------------------------------------------------------------------------------ trainer
ENTITIES = "red blue green one two three four five six seven eight nine".split()


def capital_month(chosen: str, rejected: str) -> Dataset:
    """A month of 12 conversational capital questions ("what is the capital of red"), one entity each."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"what is the capital of {entity}"}] for entity in ENTITIES],
            "chosen": [[{"role": "assistant", "content": chosen}]] * len(ENTITIES),
            "rejected": [[{"role": "assistant", "content": rejected}]] * len(ENTITIES),
        }
    )


def buffer_with_a_month(tmp_path) -> RehearsalBuffer:
    buffer = RehearsalBuffer(tmp_path / "buffer")
    buffer.add_month("m0", preference_month("yes", "no", offset=3), capacity_per_month=12)
    return buffer


def trainer(tmp_path, train_dataset=None, buffer=None, anchor_prompts=None, **options) -> ContinualDPOTrainer:
    return ContinualDPOTrainer(
        tiny_chat_llama(),
        args=continual_config(tmp_path, "m1", **options),
        train_dataset=train_dataset if train_dataset is not None else capital_month("good", "bad"),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=buffer,
        anchor_prompts=anchor_prompts,
    )


KL = dict(kl_coef=0.5, kl_anchor_max_new_tokens=2, kl_max_general_anchors=3, kl_max_rehearsal_anchors=4)


def test_the_trainer_builds_anchors_of_every_selected_kind(tmp_path):
    kinds = ["general", "same_shape", "earlier_months"]
    built = trainer(
        tmp_path, buffer=buffer_with_a_month(tmp_path), kl_anchor_kinds=kinds, kl_max_shape_anchors=5, **KL
    )
    assert built.anchors.kind_counts() == {"general": 3, "same_shape": 5, "earlier_months": 4}
    # same-shape anchors come from the month's own prompts, with the template word replaced and the entity kept
    shaped = [p for p, kind in zip(built.anchors.prompts, built.anchors.kinds) if kind == "same_shape"]
    for prompt in shaped:
        text = prompt[-1]["content"]
        assert text.startswith("what is the ") and "capital" not in text
        assert text.split(" of ")[-1] in ENTITIES and text.split(" of ")[0][12:] in SHAPE_ATTRIBUTES
    # the default kinds are today's anchors: the general prompts, then the buffer's
    default = trainer(tmp_path, buffer=RehearsalBuffer(tmp_path / "buffer"), **KL)
    assert default.anchors.kind_counts() == {"general": 3, "earlier_months": 4}
    assert default.anchors.kinds == ["general"] * 3 + ["earlier_months"] * 4


def test_anchor_prompts_per_kind_replace_that_kinds_defaults(tmp_path):
    own = ["what is the capital of france", "what is the capital of germany"]
    built = trainer(tmp_path, anchor_prompts={"same_shape": own}, kl_anchor_kinds=["general", "same_shape"], **KL)
    assert built.anchors.kind_counts() == {"general": 3, "same_shape": 2}
    assert built.anchors.prompts[3:] == own
    with pytest.raises(ValueError, match="does not select"):
        trainer(tmp_path, anchor_prompts={"same_shape": own}, **KL)
    with pytest.raises(ValueError, match="kinds must be among"):
        trainer(tmp_path, anchor_prompts={"nearby": own}, **KL)


def test_no_anchor_of_any_selected_kind_is_a_clear_error(tmp_path):
    varied = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": text}] for text in ("red one", "blue two", "green three")],
            "chosen": [[{"role": "assistant", "content": "good"}]] * 3,
            "rejected": [[{"role": "assistant", "content": "bad"}]] * 3,
        }
    )
    with pytest.raises(ValueError, match="no anchor prompt"):
        trainer(tmp_path, varied, kl_anchor_kinds=["same_shape"], **KL)


def spy_on_refreshes(monkeypatch, policy_holder: list) -> list[dict]:
    """Record every anchor refresh: the step, the model it used, and whether the result is that model's greedy
    continuation of the kept prompt ids."""
    calls = []
    original = AnchorSet.refresh_continuations

    def spy(self, model, max_new_tokens, batch_size=8, show_progress=False, indices=None):
        training = model.training
        original(self, model, max_new_tokens, batch_size=batch_size, show_progress=show_progress, indices=indices)
        assert all(self._continued[index] for index in indices)  # the window's draws are generated now
        expected = greedy_continuations(model, self.tokenizer, self.prompt_ids, max_new_tokens, show_progress=False)
        calls.append(
            dict(
                step=policy_holder[0].state.global_step,
                policy=model is policy_holder[0]._policy(),
                mode_kept=model.training == training,
                greedy=self.sequences == [p + c for p, c in zip(self.prompt_ids, expected)],
                tokens=max_new_tokens,
            )
        )

    monkeypatch.setattr(AnchorSet, "refresh_continuations", spy)
    return calls


def test_refresh_regenerates_the_continuations_from_the_policy_every_k_steps(tmp_path, monkeypatch):
    holder: list = []
    calls = spy_on_refreshes(monkeypatch, holder)
    built = trainer(tmp_path, kl_anchor_refresh_steps=2, kl_direction="reverse", max_steps=5, **KL)
    holder.append(built)
    before = [list(ids) for ids in built.anchors.sequences]
    built.train()
    assert [call["step"] for call in calls] == [2, 4]
    assert all(call["policy"] and call["mode_kept"] and call["greedy"] and call["tokens"] == 2 for call in calls)
    # the prompt ids are kept across refreshes
    assert [ids[: start + 1] for ids, start in zip(built.anchors.sequences, built.anchors.score_from)] == [
        ids[: start + 1] for ids, start in zip(before, built.anchors.score_from)
    ]


def test_without_refresh_the_reference_continuations_stay(tmp_path, monkeypatch):
    holder: list = []
    calls = spy_on_refreshes(monkeypatch, holder)
    built = trainer(tmp_path, max_steps=3, **KL)
    holder.append(built)
    before = [list(ids) for ids in built.anchors.sequences]
    built.train()
    assert calls == [] and built.anchors.sequences == before


def test_drop_continuations_keeps_the_prompt_ids(tmp_path):
    built = trainer(tmp_path, **KL)
    anchors = built.anchors
    assert all(len(ids) > len(p) for ids, p in zip(anchors.sequences, anchors.prompt_ids))
    anchors.drop_continuations()
    assert anchors.sequences == anchors.prompt_ids and anchors.sequences[0] is not anchors.prompt_ids[0]


def test_off_scope_anchors_as_calibration_batches_protect_the_answer_positions(tmp_path):
    """Without the KL the trainer builds the same anchors on request (and does not keep them); their calibration
    batches hold every anchor once, protected from the last prompt token to the continuation's end."""
    kinds = dict(kl_anchor_kinds=["general", "same_shape"], kl_max_shape_anchors=4)
    with_kl = trainer(tmp_path, **kinds, **KL)
    no_kl = trainer(tmp_path, **kinds, **{**KL, "kl_coef": 0.0})
    assert no_kl.anchors is None
    anchors = no_kl.off_scope_anchors()
    assert no_kl.anchors is None and with_kl.off_scope_anchors() is with_kl.anchors
    assert anchors.prompts == with_kl.anchors.prompts and anchors.sequences == with_kl.anchors.sequences
    batches = anchors.calibration_batches(batch_size=3)
    assert [len(batch["input_ids"]) for batch in batches] == [3, 3, 1]
    rows = [
        row for batch in batches for row in zip(*(batch[k] for k in ("input_ids", "attention_mask", "protected_mask")))
    ]
    for (ids, attention, protected), sequence, start in zip(rows, anchors.sequences, anchors.score_from):
        real = ids[attention.bool()].tolist()
        assert real == sequence  # left-padded, whole
        offset = len(ids) - len(sequence)
        assert protected.nonzero().flatten().tolist() == list(range(offset + start, len(ids) - 1))


def test_anchor_and_boundary_generation_use_their_batch_size(tmp_path, monkeypatch):
    from peft_selective.continual import anchors as anchors_module
    from peft_selective.continual import trainer as trainer_module

    sizes = []

    def spy(original):
        def wrapped(*args, **kwargs):
            sizes.append(kwargs.get("batch_size", args[4] if len(args) > 4 else None))
            return original(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(anchors_module, "greedy_continuations", spy(anchors_module.greedy_continuations))
    monkeypatch.setattr(trainer_module, "greedy_continuations", spy(trainer_module.greedy_continuations))
    built = trainer(tmp_path, boundary_pairs=2, anchor_generation_batch_size=3, **KL)
    assert sizes == [3]  # the boundary answers; the anchors' continuations when first needed
    built.anchors.ensure_continued()
    assert sizes == [3, 3]


def test_only_the_anchors_the_steps_draw_are_continued_once_when_training_starts(tmp_path, monkeypatch):
    """A month draws few of its anchors: the trainer continues those it will draw, in one go before the first step,
    with the month t−1 model's continuations an eager generation of every anchor gives; none is generated mid-way."""
    options = {**KL, "kl_max_general_anchors": 24, "max_steps": 3, "gradient_accumulation_steps": 2}
    built = trainer(tmp_path, **options)
    anchors = built.anchors
    assert anchors.continued_count == 0  # nothing generated when the trainer is built
    drawn, generated_in_steps = [], []
    original_draw, original_ensure = AnchorSet.draw, AnchorSet.ensure_continued

    def sample(self, batch_size, rng, device):  # the KL's draws
        indices = original_draw(self, batch_size, rng)
        drawn.extend(indices)
        generated_in_steps.append(original_ensure(self, indices))
        return self._batch(indices, device)

    monkeypatch.setattr(AnchorSet, "sample", sample)
    built.train()
    continued = {index for index in range(len(anchors)) if anchors._continued[index]}
    # 3 steps x 2 micro-batches planned; 12 rows in batches of 4 give an epoch's last step one micro-batch only
    assert len(drawn) == 5 * built._kl_batch_size()
    planned = built._planned_anchor_draws(0, 3)
    assert len(planned) == 6 * built._kl_batch_size()
    assert set(drawn) <= continued == set(planned) and len(continued) < len(anchors)
    assert not any(generated_in_steps)  # every draw was planned
    eager = AnchorSet(anchors.prompts, anchors.tokenizer, max_length=anchors.max_length)
    eager.add_continuations(built._reference_model(), 2, show_progress=False)
    assert all(anchors._sequences[index] == eager.sequences[index] for index in continued)
    assert anchors.sequences == eager.sequences  # reading them all continues the rest


def decoded_greedy(model, tokenizer, prompt, max_new_tokens) -> str:
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids["input_ids"]]),
            attention_mask=torch.ones(1, len(ids["input_ids"]), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids["input_ids"]) :], skip_special_tokens=True).strip()


def test_boundary_rows_prefer_the_references_answer_over_the_months_style(tmp_path, monkeypatch):
    finish_boundary_answers(monkeypatch)
    month_rows = capital_month("good", "bad")
    built = trainer(tmp_path, month_rows, boundary_pairs=5, boundary_max_new_tokens=4)
    data = built.train_dataset
    flags = data[BOUNDARY_FLAG]
    assert sum(flags) == built.boundary_rows and len(data) == len(month_rows) + built.boundary_rows
    assert built.boundary_rows >= 3  # an empty answer (EOS first) is skipped, with a log line
    month_prompts = [row[0]["content"] for row in month_rows["prompt"]]
    tokenizer = word_chat_tokenizer()
    reference = built.ref_model
    for row in data.select([i for i, flag in enumerate(flags) if flag]):
        prompt = row["prompt"][-1]["content"]
        assert prompt not in month_prompts and "capital" not in prompt  # a same-shape variant
        assert row["rejected"] == [{"role": "assistant", "content": "good"}]  # the month's chosen answer
        assert row["chosen"][0]["role"] == "assistant"
        assert row["chosen"][0]["content"] == decoded_greedy(reference, tokenizer, row["prompt"], 4)
        assert row["chosen_ids"] and row["prompt_ids"]  # tokenized like the others
    assert not any(flags[: len(month_rows)])
    # the month's rows are the ones kept for rehearsal and the Fisher, not the boundary rows
    assert len(built.month_dataset) == len(month_rows)
    built.train()
    logged = {key for entry in built.state.log_history for key in entry}
    assert "boundary/fraction" in logged


def test_boundary_rows_top_up_with_general_prompts_and_work_with_own_month_rehearsal(tmp_path, monkeypatch):
    finish_boundary_answers(monkeypatch)
    first = trainer(tmp_path, capital_month("yes", "no"), buffer=RehearsalBuffer(tmp_path / "buffer"), max_steps=1)
    first.train()
    first.finish_month("m1")
    second = ContinualDPOTrainer(
        first.model,
        args=continual_config(
            tmp_path, "m2", rehearsal_ratio=0.25, boundary_pairs=40, boundary_max_new_tokens=3, max_steps=2
        ),
        train_dataset=capital_month("good", "bad"),
        processing_class=word_chat_tokenizer(),
        peft_config=SelectiveMLPConfig(rank=4),
        rehearsal_buffer=first.rehearsal_buffer,
    )
    assert isinstance(second.model, PeftModel)
    data = second.train_dataset
    boundary = data.select([i for i, flag in enumerate(data[BOUNDARY_FLAG]) if flag])
    # 12 month prompts x 16 attributes would do; with 40 asked they are all same-shape variants
    assert len(boundary) == second.boundary_rows > 0
    assert set(boundary["source"]) == {"boundary"} and not any(boundary["is_rehearsal"])
    assert all(value is None for value in boundary["rehearsal_ref_chosen_logps"])  # the month t−1 reference
    assert second.own_reference_rows > 0  # rehearsed rows keep their own month's reference
    second.train()


def test_boundary_rows_fall_back_to_general_prompts_for_string_months(tmp_path, monkeypatch):
    from peft_selective.continual import trainer as trainer_module

    # (the random tiny model's answers to the general prompts, unknown words to its tokenizer, decode empty)
    answer = [word_chat_tokenizer().convert_tokens_to_ids("yes"), EOS]
    monkeypatch.setattr(trainer_module, "greedy_continuations", lambda model, tok, ids, *a, **k: [answer] * len(ids))
    varied = Dataset.from_dict(
        {"prompt": ["red one", "blue two", "green three"], "chosen": ["good"] * 3, "rejected": ["bad"] * 3}
    )
    built = trainer(tmp_path, varied, boundary_pairs=4, boundary_max_new_tokens=3)
    data = built.train_dataset
    boundary = data.select([i for i, flag in enumerate(data[BOUNDARY_FLAG]) if flag])
    general = __import__("peft_selective.continual", fromlist=["x"]).general_anchor_prompts()
    assert len(boundary) > 0 and all(prompt in general for prompt in boundary["prompt"])  # strings, like the month's
    assert all(rejected.startswith("good") for rejected in boundary["rejected"])  # TRL appends EOS


def test_boundary_answers_cut_by_the_budget_keep_their_whole_sentences_or_are_skipped(tmp_path, monkeypatch, caplog):
    """An answer still going at `boundary_max_new_tokens` would, as a closed assistant turn, teach the model to stop
    mid-sentence: it keeps its whole sentences, and one with none is skipped; a finished answer stays whole."""
    from peft_selective.continual import trainer as trainer_module

    tokenizer = word_chat_tokenizer(extra_words=(".",))
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ("yes", "no", "red", ".")}
    answers = [
        [ids["yes"], ids["."], ids["no"], ids["red"]],  # cut by the budget of 4 after a sentence: "yes ."
        [ids["yes"], ids["no"], ids["red"], ids["no"]],  # cut with no sentence end: skipped
        [ids["no"], ids["red"], tokenizer.eos_token_id],  # finished (EOS): whole, though it has no "."
        [ids["red"], ids["yes"], ids["no"]],  # finished (shorter than the budget): whole
    ]

    def build(generated):  # a trainer whose month t-1 model answers the boundary prompts with `generated`
        monkeypatch.setattr(trainer_module, "greedy_continuations", lambda *args, **kwargs: generated)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="peft_selective.continual.trainer"):
            return ContinualDPOTrainer(
                tiny_chat_llama(),
                args=continual_config(tmp_path, "m1", boundary_pairs=4, boundary_max_new_tokens=4),
                train_dataset=capital_month("good", "bad"),
                processing_class=tokenizer,
                peft_config=SelectiveMLPConfig(rank=4),
            )

    built = build(answers)
    data = built.train_dataset
    chosen = [row["chosen"][0]["content"] for row in data.select([i for i, f in enumerate(data[BOUNDARY_FLAG]) if f])]
    assert chosen == ["yes .", "no red", "red yes no"] and built.boundary_rows == 3
    assert "1 cut to their whole sentences, 1 skipped" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    # most answers cut with no sentence end: the month would train with a fraction of its boundary rows, so it warns
    assert build([answers[1]] * 3 + [answers[2]]).boundary_rows == 1
    assert "Only 1 of boundary_pairs=4 boundary rows: 3 answers had no complete sentence" in caplog.text


def test_whole_sentences_ends_at_the_last_complete_sentence():
    assert whole_sentences("The sky is blue. It is a fun") == "The sky is blue."
    assert whole_sentences("Why? Because it rains! And th") == "Why? Because it rains!"
    assert (
        whole_sentences("1. Be yourself. Authenticity is key. Don't be afr") == "1. Be yourself. Authenticity is key."
    )
    assert whole_sentences("It has 3.5 million people. It is") == "It has 3.5 million people."
    assert whole_sentences("- tea\n- coff") == "- tea"
    assert whole_sentences("1. Be") is None and whole_sentences("no end here") is None and whole_sentences("") is None


def test_greedy_continuations_batch_by_length_and_reuse_known_ones(tmp_path):
    model, tokenizer = tiny_chat_llama().eval(), word_chat_tokenizer()
    prompts = [[{"role": "user", "content": " ".join(["question"] * n)}] for n in (5, 1, 3, 6, 4, 2)]
    sequences = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    # one at a time (no padding) and in batches of sequences of similar length: the same continuations, in order
    alone = [greedy_continuations(model, tokenizer, [ids], 4, show_progress=False)[0] for ids in sequences]
    assert greedy_continuations(model, tokenizer, sequences, 4, batch_size=3, show_progress=False) == alone
    # a continuation known with more tokens is cut, not generated again
    longer = greedy_continuations(model, tokenizer, sequences[:2], 6, show_progress=False)
    known = {tuple(ids): answer for ids, answer in zip(sequences[:2], longer)}
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting
    assert (
        greedy_continuations(model, tokenizer, sequences, 4, batch_size=8, show_progress=False, known=known) == alone
    )
    assert calls == [4]  # the 4 others only
    assert greedy_continuations(model, tokenizer, sequences[:2], 4, show_progress=False, known=known) == alone[:2]
    assert calls == [4]  # nothing generated


def test_same_shape_anchors_reuse_the_boundary_answers_of_the_same_prompts(tmp_path, monkeypatch):
    generated: list[list] = []
    original = greedy_continuations

    def spy(model, tokenizer, sequences, max_new_tokens, *args, **kwargs):
        result = original(model, tokenizer, sequences, max_new_tokens, *args, **kwargs)
        known = kwargs.get("known") or {}
        generated.append([tuple(ids) for ids in sequences if tuple(ids) not in known])
        return result

    monkeypatch.setattr("peft_selective.continual.trainer.greedy_continuations", spy)
    monkeypatch.setattr("peft_selective.continual.anchors.greedy_continuations", spy)
    built = trainer(
        tmp_path,
        capital_month("good", "bad"),
        kl_anchor_kinds=["same_shape"],
        kl_max_shape_anchors=8,
        boundary_pairs=4,
        boundary_max_new_tokens=6,
        **{**KL, "kl_anchor_max_new_tokens": 3},
    )
    built.anchors.ensure_continued()  # (when the trainer needs them)
    boundary, anchors = generated
    assert len(boundary) == 4 and set(boundary) <= {tuple(ids) for ids in built.anchors.prompt_ids}
    assert not set(boundary) & set(anchors) and len(anchors) == 8 - 4  # no prompt generated twice
    # the anchors are the reference's greedy continuations all the same
    expected = original(built.ref_model, built.anchors.tokenizer, built.anchors.prompt_ids, 3, show_progress=False)
    assert built.anchors.sequences == [p + c for p, c in zip(built.anchors.prompt_ids, expected)]
