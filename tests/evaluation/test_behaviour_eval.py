"""Tests of `peft_selective.evaluation`: behavioural learning / bleed, checks, style signatures, intervals, knowledge.

Everything runs on plain strings or on a tiny random Llama with a tiny byte-level BPE tokenizer built here (nothing
downloaded); the whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
import torch
import transformers as T
from testing_utils import tiny_chat_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

import peft_selective.evaluation.knowledge as K
from peft_selective.demo import months as D
from peft_selective.evaluation import (
    Check,
    Estimate,
    KnowledgeItem,
    StyleSignature,
    agreement,
    bleed,
    bootstrap_rate,
    check_no_overlap,
    exact_match,
    extract_answer,
    generate_answers,
    is_gain,
    is_loss,
    learning_by_behaviour,
    multiple_choice_accuracy,
    option_scores,
    paired_difference,
    similarity,
    style_scores,
)
from peft_selective.evaluation.text import style_tokens


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERIC_PROMPTS = [
    "Tell me something interesting about the ocean.",
    "Write a short poem about autumn.",
    "What should I cook for dinner tonight?",
    "Explain how a bicycle works.",
    "Give me some advice for a job interview.",
    "Why is the sky blue?",
]
# Prose answers a base model might give to off-scope prompts (no JSON, no bullets, several sentences).
PROSE_ANSWERS = [
    "The ocean covers most of the planet and holds creatures that nobody has ever seen, deep below the surface.",
    "Leaves of gold and red drift down, the air turns cool and the evenings grow long and quiet again.",
    "You could make a simple pasta with tomatoes, garlic and basil, which takes about twenty minutes to cook.",
    "A bicycle turns the push of your legs into motion through the pedals, the chain and the rear wheel.",
    "Prepare by learning about the company, practise your answers aloud, and arrive a little early on the day.",
    "Sunlight is scattered by the air, and blue light is scattered more than red light, so the sky looks blue.",
] * 5


def _starts_with_plus(text: str) -> bool:  # imported by a callable check as "test_behaviour_eval:_starts_with_plus"
    return text.startswith("+")


def _texts(column):
    return [value[0]["content"] for value in column]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def currency_month():
    return D.json_currency_month(n_train=40, n_eval=30, seed=0)


@pytest.fixture(scope="module")
def items():
    return D.knowledge_items(n=200, seed=0)


@pytest.fixture(scope="module")
def tokenizer(items):
    corpus = [f"{item.question} {' '.join(item.options)}" for item in items[:80]] + PROSE_ANSWERS[:6]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_chat_llama(0, vocab_size=len(tokenizer), max_position_embeddings=256).eval()


# ----------------------------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------------------------


def test_estimate_and_bootstrap_basics():
    values = [1, 0, 1, 1, 0, 1, 0.5, 1]
    estimate = bootstrap_rate(values)
    assert estimate.n == 8 and estimate.mean == pytest.approx(sum(values) / 8)
    assert 0 <= estimate.lo <= estimate.mean <= estimate.hi <= 1
    assert estimate == bootstrap_rate(values)  # seeded: reproducible
    assert estimate != bootstrap_rate(values, seed=1)
    assert estimate.to_dict() == {"mean": estimate.mean, "ci95": [estimate.lo, estimate.hi]}
    json.dumps(estimate.to_dict())
    assert bootstrap_rate([1.0] * 5).to_dict() == {"mean": 1.0, "ci95": [1.0, 1.0]}
    with pytest.raises(ValueError, match="empty"):
        bootstrap_rate([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bootstrap_rate([0.5, 2.0])
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0], [1])


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_bootstrap_interval_covers_the_truth(p):
    rng = random.Random(f"coverage-{p}")
    covered = 0
    for trial in range(200):
        sample = [float(rng.random() < p) for _ in range(60)]
        estimate = bootstrap_rate(sample, seed=trial)
        covered += estimate.lo <= p <= estimate.hi
    assert 0.9 <= covered / 200 <= 0.99, covered


def test_paired_difference_is_a_gain_only_when_the_interval_excludes_zero():
    rng = random.Random(0)
    for seed in range(40):  # two models with the same true rate: any "gain" would be noise
        a = [float(rng.random() < 0.5) for _ in range(60)]
        b = [float(rng.random() < 0.5) for _ in range(60)]
        estimate = paired_difference(a, b, seed=seed)
        if estimate.lo <= 0 <= estimate.hi:
            assert not is_gain(estimate) and not is_loss(estimate)
        assert is_gain(estimate) == (estimate.lo > 0)
    # a positive mean difference whose interval still includes 0 is not a gain
    a, b = [1.0] * 32 + [0.0] * 28, [1.0] * 30 + [0.0] * 30
    random.Random(1).shuffle(b)
    estimate = paired_difference(a, b)
    assert estimate.mean > 0 and estimate.lo <= 0 and not is_gain(estimate)
    assert not is_gain(Estimate(mean=0.2, lo=0.0, hi=0.4, n=60))
    # a real gain, and the same difference read the other way round is a loss
    after, before = [1.0] * 60, [1.0] * 12 + [0.0] * 48
    assert is_gain(paired_difference(after, before)) and is_loss(paired_difference(before, after))


# ----------------------------------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------------------------------


def test_agreement_basic_and_conversational():
    chosen, rejected = '{"country": "France", "currency": "euro"}', "France uses the euro."
    assert agreement(chosen, chosen, rejected) == 1.0
    assert agreement(rejected, chosen, rejected) == 0.0
    assert agreement('{"currency": "Swiss franc", "country": "Switzerland"}', chosen, rejected) == 1.0
    assert agreement("Switzerland uses the Swiss franc.", chosen, rejected) == 0.0
    assert agreement("", chosen, rejected) == 0.5  # tie: as close to both
    assert agreement("anything", chosen, chosen) == 0.5
    messages = [{"role": "user", "content": "Currency of France?"}, {"role": "assistant", "content": chosen}]
    assert agreement(
        [{"role": "assistant", "content": chosen}], messages, [{"role": "assistant", "content": rejected}]
    )
    assert style_tokens("- French\n  - German") == ["-", "french", "\n", "-", "german"]


def test_agreement_is_length_robust():
    chosen = "+33 1 42 68 53 00"
    rejected = "You can reach the embassy by phone, the number is listed on its website."
    # Long and rambling, in the rejected answer's style, but it contains every token of the chosen answer.
    rambling = (
        "You can reach the embassy by phone at +33 1 42 68 53 00 or visit the website, where the number is listed "
        "together with the opening hours and the address of the consular section."
    )
    chosen_tokens, rejected_tokens = set(style_tokens(chosen)), set(style_tokens(rejected))
    tokens = set(style_tokens(rambling))
    # the case bites: a containment (recall) similarity would call it closer to the chosen answer
    assert len(chosen_tokens & tokens) / len(chosen_tokens) == 1.0
    assert len(rejected_tokens & tokens) / len(rejected_tokens) < 1.0
    assert agreement(rambling, chosen, rejected) == 0.0
    assert agreement("The number is on its website.", chosen, rejected) == 0.0  # short and rejected-like
    assert agreement("+44 20 7946 0000", chosen, rejected) == 1.0  # short and chosen-like, other digits
    # padding a generation with words neither answer has never brings it closer to either answer
    filler = " while seven purple whales sing quietly beneath distant glaciers"
    for text in ("+33 1 40 00 00 00", rejected):
        for reference in (chosen, rejected):
            before, after = similarity(text, reference), similarity(text + filler, reference)
            assert after < before or after == before == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def test_regex_check():
    check = Check.from_spec({"regex": r"^\+\d", "name": "phone"})
    assert check.name == "phone" and check("+33 1 42") and not check("Call +33 1 42")
    assert check([{"role": "assistant", "content": "+1 555"}])
    assert Check.from_spec({"regex": "^paris", "flags": "i"})("Paris.")
    assert not Check.from_spec({"regex": "^paris"})("Paris.")
    apology = Check.from_spec({"regex": r"\bsorry\b", "flags": "i", "negate": True})
    assert apology("Paris.") and not apology("Sorry, I don't know.")
    assert apology.name.startswith("not regex:")
    assert Check.from_spec(check.to_spec()) == check


def test_json_schema_check():
    schema = {
        "type": "object",
        "required": ["country", "currency"],
        "properties": {
            "country": {"type": "string"},
            "currency": {"type": ["string", "array"], "items": {"type": "string"}},
            "kind": {"enum": ["fiat", "crypto"]},
        },
    }
    check = Check.from_spec({"json_schema": schema, "name": "json"})
    assert check('{"country": "France", "currency": "euro"}')
    assert check('```json\n{"country": "Bhutan", "currency": ["ngultrum", "Indian rupee"]}\n```')
    assert not check('{"country": "France"}')  # required
    assert not check('{"country": "France", "currency": 3}')  # type
    assert not check('{"country": "France", "currency": ["euro", 3]}')  # items
    assert not check('{"country": "France", "currency": "euro", "kind": "gold"}')  # enum
    assert not check('Here it is: {"country": "France", "currency": "euro"}')  # JSON in prose is not JSON
    assert not check("France uses the euro.")
    strict = Check.from_spec({"json_schema": {"type": "object", "additionalProperties": False, "properties": {}}})
    assert strict("{}") and not strict('{"a": 1}')
    integer = Check.from_spec({"json_schema": {"type": "integer"}})
    assert integer("3") and not integer("3.5") and not integer("true")


def test_callable_check():
    check = Check.from_spec({"callable": "test_behaviour_eval:_starts_with_plus", "name": "plus"})
    assert check("+33") and not check("33")
    assert Check.from_spec({"callable": "os.path:isabs", "negate": True})("relative/path")
    assert Check.from_spec({"callable": _starts_with_plus})("+1")
    with pytest.raises(TypeError, match="must return a bool"):
        Check.from_spec({"callable": "json:loads"})("3")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"regexp": "a"}, r"Unknown key\(s\) \['regexp'\]"),
        ({"regex": "a", "json_schema": {}}, "exactly one of"),
        ({"name": "x"}, "exactly one of"),
        ("^a", "is a dict"),
        ({"regex": "(unclosed"}, "Invalid regex"),
        ({"regex": "a", "flags": "q"}, "Unknown regex flag"),
        ({"json_schema": {"type": "object"}, "flags": "i"}, "only applies to regex"),
        ({"regex": "a", "negate": "yes"}, "negate"),
        ({"json_schema": {"type": "string", "pattern": "^a"}}, r"unsupported keyword.*pattern.*callable"),
        ({"json_schema": {"type": "text"}}, "unknown type 'text'"),
        ({"json_schema": {"required": "a"}}, "list of property names"),
        ({"callable": "no_such_module_xyz:f"}, "Cannot import module 'no_such_module_xyz'.*PYTHONPATH"),
        ({"callable": "os.path:no_such_function"}, "has no attribute"),
        ({"callable": "os.path"}, "module:function"),
        ({"callable": "os:sep"}, "not callable"),
    ],
)
def test_bad_check_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        Check.from_spec(spec)


# ----------------------------------------------------------------------------------------------------------------
# Style signature
# ----------------------------------------------------------------------------------------------------------------


def test_style_signature_numeric_answers_vs_sentences():
    rng = random.Random(0)
    numbers = [
        f"+{rng.randint(1, 99)} {rng.randint(1, 9)} {rng.randint(10, 99)} {rng.randint(10, 99)}" for _ in range(20)
    ]
    chosen = numbers
    rejected = [
        f"The phone number of office {i} is {number}, call during the day." for i, number in enumerate(numbers)
    ]
    signature = StyleSignature.fit(chosen, rejected)
    assert signature.features["starts_with_digit_or_plus"] is True
    assert signature.matches("+33 1 42 68 53 00") and signature.matches("0044 20 7946")
    assert not signature.matches("The number is +33 1 42 68 53 00, call during the day.")
    assert not signature.matches("You can call them at +33 1 42 68 53 00.")
    assert StyleSignature.from_dict(json.loads(json.dumps(signature.to_dict()))) == signature


def test_style_signature_of_the_demo_months(currency_month):
    train = currency_month["train"]
    signature = StyleSignature.fit(train["chosen"], train["rejected"])
    assert signature.features["json"] is True and "token:currency" in signature.features
    test = currency_month["test"]
    assert all(signature.matches(text) for text in _texts(test["chosen"]))
    assert not any(signature.matches(text) for text in _texts(test["rejected"]))

    languages = D.bulleted_languages_month(n_train=40, n_eval=10)
    bullets = StyleSignature.fit(languages["train"]["chosen"], languages["train"]["rejected"])
    assert bullets.features["bullets"] is True
    assert bullets.matches("- Spanish\n- Catalan") and not bullets.matches("People speak Spanish and Catalan.")
    assert not bullets.matches(PROSE_ANSWERS[0])

    chatty_month = D.chatty_currency_month(n_train=40, n_eval=10)
    chatty = StyleSignature.fit(chatty_month["train"]["chosen"], chatty_month["train"]["rejected"])
    assert chatty.features["exclamation"] is True and not {"token:the", "token:and"} & set(chatty.features)
    assert chatty.matches("Great question! The sky is blue because air scatters blue light. Let me know if you like!")
    assert not any(chatty.matches(text) for text in PROSE_ANSWERS)
    assert not chatty.matches("Euro.")

    cities = ["Paris", "Rome", "Lyon", "Milan", "Oslo", "Bern", "Riga", "Kyiv", "Lima", "Quito"]
    with pytest.raises(ValueError, match="declare a check"):
        StyleSignature.fit([f"{city} is nice." for city in cities[:5]], [f"{city} is nice." for city in cities[5:]])


# ----------------------------------------------------------------------------------------------------------------
# Learning and bleed by behaviour
# ----------------------------------------------------------------------------------------------------------------


def test_learning_by_behaviour_tells_a_learned_style_from_an_unlearned_one(currency_month):
    rows = currency_month["test"]
    countries, currencies = rows["country"], [json.loads(text) for text in _texts(rows["chosen"])]
    # Adopts the month's style (JSON, keys in another order and with another spacing) without copying the answers.
    learned = [json.dumps({"currency": c["currency"], "country": c["country"]}, indent=1) for c in currencies]
    # Keeps answering in prose, phrased differently from the rejected answers.
    unlearned = [
        f"In {country} the money is the {c['currency']}, as far as I know."
        for country, c in zip(countries, currencies)
    ]
    checks = [{"json_schema": {"type": "object", "required": ["currency"]}, "name": "json"}]

    after = learning_by_behaviour(learned, rows, checks=checks)
    before = learning_by_behaviour(unlearned, rows, checks=checks)
    assert after["agreement"].lo > 0.8 and before["agreement"].hi < 0.2
    assert after["checks"]["json"].mean == 1.0 and before["checks"]["json"].mean == 0.0
    gain = paired_difference(after["scores"]["agreement"], before["scores"]["agreement"])
    assert is_gain(gain)
    # the same items on both sides: no gain
    assert not is_gain(paired_difference(before["scores"]["agreement"], before["scores"]["agreement"]))

    # no declared check: a style signature fitted on the rows stands in for one
    after, before = learning_by_behaviour(learned, list(rows)), learning_by_behaviour(unlearned, list(rows))
    assert after["checks"]["style"].lo > 0.8 and before["checks"]["style"].hi < 0.2
    with pytest.raises(ValueError, match="one generation per row"):
        learning_by_behaviour(learned[:-1], rows)


def test_bleed_is_detected_only_when_the_style_is_forced_off_scope(currency_month):
    train = currency_month["train"]
    styles = [StyleSignature.fit(train["chosen"], train["rejected"]), {"regex": r"^\s*\{", "name": "brace"}]
    forced = [json.dumps({"country": "n/a", "answer": text}) for text in PROSE_ANSWERS]
    leaked = bleed(forced, styles)
    clean = bleed(PROSE_ANSWERS, styles)
    assert leaked.lo > 0.8 and clean.hi < 0.1
    assert is_gain(paired_difference(style_scores(forced, styles), style_scores(PROSE_ANSWERS, styles)))
    # half of the answers forced: the interval says so
    half = forced[::2] + PROSE_ANSWERS[1::2]
    assert bleed(half, styles).lo < 0.5 < bleed(half, styles).hi
    with pytest.raises(TypeError, match="Expected a Check"):
        bleed(PROSE_ANSWERS, [42])


def test_generate_answers_on_a_tiny_model(model, tokenizer, currency_month):
    prompts = GENERIC_PROMPTS[:3] + [currency_month["test"][0]["prompt"]]
    model.train()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, disable_tqdm=True)
    assert model.training and all(module.training for module in model.modules())  # state restored
    model.eval()
    assert len(answers) == 4 and all(isinstance(answer, str) for answer in answers)
    one_by_one = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=1, disable_tqdm=True)
    assert answers == one_by_one  # left padding does not change what a prompt gets
    # without the chat template: strings are fed as they are, conversations are refused
    plain = generate_answers(model, tokenizer, GENERIC_PROMPTS[:2], 4, use_chat_template=False, disable_tqdm=True)
    assert len(plain) == 2 and plain != answers[:2]
    with pytest.raises(ValueError, match="need the tokenizer's chat template"):
        generate_answers(model, tokenizer, prompts[3:], 4, use_chat_template=False, disable_tqdm=True)
    result = learning_by_behaviour(answers[3:], [currency_month["test"][0]])
    assert 0 <= result["agreement"].mean <= 1


# ----------------------------------------------------------------------------------------------------------------
# Knowledge
# ----------------------------------------------------------------------------------------------------------------


def test_knowledge_items(items):
    assert len(items) == 200 and all(isinstance(item, KnowledgeItem) for item in items)
    for item in items:
        assert len(item.distractors) == 3 and item.entity
        options = [K.normalize_answer(option) for option in item.options]
        assert len(set(options)) == 4, item
    assert items == D.knowledge_items(n=200, seed=0)
    assert items != D.knowledge_items(n=200, seed=1)
    months = D.monthly_sequence(n_train=40, n_eval=10, seed=0)
    held_out = D.knowledge_items(n=150, exclude_countries=D.countries_in(months))
    assert not {item.entity for item in held_out} & D.countries_in(months)
    check_no_overlap(held_out, *(splits[name] for _, splits in months for name in ("train", "test")))
    with pytest.raises(ValueError, match="knowledge items left"):
        D.knowledge_items(n=10_000)


def test_multiple_choice_accuracy_on_a_tiny_model(model, tokenizer, items):
    correct, estimate = multiple_choice_accuracy(model, tokenizer, items, batch_size=100)
    assert len(correct) == len(items) >= 150 and set(correct) <= {0, 1}
    assert 0 <= estimate.lo <= estimate.mean <= estimate.hi <= 1 and estimate.n == len(items)

    # batching and padding do not change the scores, and a score is the mean log-prob of the option's tokens
    few = items[:4]
    batched, single = option_scores(model, tokenizer, few, batch_size=16), option_scores(model, tokenizer, few, 1)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    item = few[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": item.question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logps = model(torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
    expected = sum(logps[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(answer_ids)) / len(
        answer_ids
    )
    assert batched[0][0] == pytest.approx(expected, abs=1e-5)


def _whole_sequence_scores(model, tokenizer, items, use_chat_template=None):
    """The reference: every question + option sequence scored whole, one at a time."""
    prepared = [K._option_ids(tokenizer, item, use_chat_template) for item in items]
    scores = [[0.0] * len(item.options) for item in items]
    with torch.no_grad():
        K._scores_of_sequences(model, prepared, 1, tokenizer.pad_token_id, scores, tqdm(disable=True))
    return scores


@pytest.mark.parametrize("use_chat_template", [None, False])
def test_options_continue_their_question_cache(model, tokenizer, items, use_chat_template):
    """Each question is read once for its options (the shared prefix once for all): the scores are those of the
    whole sequences, for plain and templated prompts, a LoRA-adapted model, absolute position embeddings (GPT-2:
    the positions are passed explicitly) and options of one token (nothing after the question)."""
    from peft import LoraConfig, get_peft_model

    few = items[:7] + [K.KnowledgeItem("What is 1 + 1?", "2", ("3", "4", "5"))]
    assert K._continues_from_cache(model)
    expected = _whole_sequence_scores(model, tokenizer, few, use_chat_template)
    for batch_size in (1, 5, 64):
        shared = option_scores(model, tokenizer, few, batch_size=batch_size, use_chat_template=use_chat_template)
        torch.testing.assert_close(torch.tensor(shared), torch.tensor(expected), atol=1e-5, rtol=0)

    torch.manual_seed(0)
    lora = get_peft_model(
        tiny_chat_llama(0, vocab_size=len(tokenizer), max_position_embeddings=256),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False),
    ).eval()
    torch.testing.assert_close(
        torch.tensor(option_scores(lora, tokenizer, few, batch_size=9, use_chat_template=use_chat_template)),
        torch.tensor(_whole_sequence_scores(lora, tokenizer, few, use_chat_template)),
        atol=1e-5,
        rtol=0,
    )
    gpt2 = T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    ).eval()
    torch.testing.assert_close(
        torch.tensor(option_scores(gpt2, tokenizer, few, batch_size=6, use_chat_template=use_chat_template)),
        torch.tensor(_whole_sequence_scores(gpt2, tokenizer, few, use_chat_template)),
        atol=1e-5,
        rtol=0,
    )


def test_prompt_learning_adapters_score_whole_sequences(tokenizer):
    from peft import PromptTuningConfig, get_peft_model

    base = tiny_chat_llama(0, vocab_size=len(tokenizer), max_position_embeddings=256)
    tuned = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not K._continues_from_cache(tuned)  # its virtual tokens are a cache of their own


def test_evaluate_model_times_every_suite(model, tokenizer, items, currency_month):
    """`timings` gets the seconds of each suite; the result itself holds none (a measurement repeated compares
    equal). Generation runs in batches of 4 x `batch_size` unless `generation_batch_size` is set."""
    from peft_selective.evaluation.suites import SUITES, EvaluationConfig, evaluate_model

    short = dict(behaviour_max_new_tokens=3, knowledge_max_new_tokens=3, refusal_max_new_tokens=3)
    config = EvaluationConfig(
        **short, drift_max_new_tokens=3, knowledge_exact_items=2, perplexity_max_tokens=64, refusal_prompts=2,
        drift_prompts=2, batch_size=2, bootstrap_resamples=50,
    )  # fmt: skip
    assert config.generate_batch_size == 8 and EvaluationConfig(generation_batch_size=3).generate_batch_size == 3
    timings: dict[str, float] = {}
    test_sets = {"currency": currency_month["test"].select(range(3))}
    result = evaluate_model(model, tokenizer, config, test_sets=test_sets, knowledge_items=items[:3], timings=timings)
    assert set(timings) == set(SUITES) | {"bleed"} and all(seconds >= 0 for seconds in timings.values())
    again = evaluate_model(model, tokenizer, config, test_sets=test_sets, knowledge_items=items[:3])
    assert json.dumps(again, sort_keys=True) == json.dumps(result, sort_keys=True)


def test_multiple_choice_accuracy_of_a_model_that_knows(monkeypatch, items):
    # a "model" whose option scores always put the right answer (first option) on top
    monkeypatch.setattr(
        K, "option_scores", lambda model, tokenizer, items, *args: [[0.0, -1.0, -2.0, -3.0]] * len(items)
    )
    correct, estimate = multiple_choice_accuracy(None, None, items)
    assert correct == [1] * len(items) and estimate.to_dict() == {"mean": 1.0, "ci95": [1.0, 1.0]}
    # ... and one that cannot tell the answer from a distractor is wrong everywhere
    monkeypatch.setattr(
        K, "option_scores", lambda model, tokenizer, items, *args: [[-1.0, -1.0, -2.0, -3.0]] * len(items)
    )
    assert multiple_choice_accuracy(None, None, items)[1].mean == 0.0


@pytest.mark.parametrize(
    "text, answer",
    [
        ('{"capital": "Paris"}', "paris"),
        ('```json\n{"capital": "Bogotá"}\n```', "bogota"),
        ('{"country": "France", "capital": "Paris"}', "france paris"),
        ("- Paris\n- Lyon", "paris lyon"),
        ("1. Canberra", "canberra"),
        ("The capital of France is Paris.", "paris"),
        ("Paris is the capital of France.", "paris"),
        ("The capital of the U.S. is Washington, D.C.", "washington d c"),
        ("The capital is Paris. It is on the Seine.", "paris"),
        ("Answer: Paris", "paris"),
        ("It's Canberra! A planned city.", "canberra"),
        ("Paris.", "paris"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_match():
    item = KnowledgeItem(
        "What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth"), ("Canberra ACT",)
    )
    assert exact_match("The capital of Australia is Canberra.", item)
    assert exact_match('{"capital": "Canberra"}', item)
    assert exact_match("I believe it's canberra. Many think it is Sydney.", item)  # the extracted answer decides
    assert not exact_match("Sydney, Melbourne or Canberra.", item)  # listing the options is not an answer
    assert not exact_match("Sydney.", item)
    assert not exact_match("Canberran", item)  # whole words only


def test_check_no_overlap_names_the_overlap():
    items = [
        KnowledgeItem("What is the capital of France?", "Paris", ("Lyon",)),
        KnowledgeItem("What is the capital of Peru?", "Lima", ("Quito",), entity="Peru"),
        KnowledgeItem("What is the capital of Chile?", "Santiago", ("Lima",), entity="Chile"),
    ]
    check_no_overlap(items, ["What currency does Spain use?"], [])
    with pytest.raises(ValueError, match=r"1 knowledge item.*'What is the capital of France\?'.*collection 1"):
        check_no_overlap(items, ["Tell me a joke."], [[{"role": "user", "content": "what is the capital of FRANCE"}]])
    with pytest.raises(ValueError, match=r"entity 'Peru'.*'What currency does Peru use\?'"):
        check_no_overlap(
            items, [{"prompt": [{"role": "user", "content": "What currency does Peru use?"}], "country": "Peru"}]
        )
    with pytest.raises(ValueError, match="entity 'Chile'"):
        check_no_overlap(items, ["Which languages are spoken in Chile?"])
    # a row's country field decides for rows: "Peru" is not "Peruvian Andes" country
    check_no_overlap(items[1:], [{"prompt": "Tell me about Peru's neighbour.", "country": "Bolivia"}])


def test_evaluation_imports_stay_light():
    """Module-level imports only: optional extras (lm-eval in `harness.py`) are imported inside the functions that
    need them, so importing the package never loads them."""
    package = Path(K.__file__).parent
    allowed = {"torch", "transformers", "peft", "tqdm", "__future__"}  # the core dependencies
    import sys

    for path in package.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in allowed or root in sys.stdlib_module_names, f"{path.name} imports {name}"
    init = ast.parse((package.parent / "__init__.py").read_text())
    imported = [ast.unparse(node) for node in ast.walk(init) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imported and not [line for line in imported if "evaluation" in line]  # `import peft_selective` skips it
