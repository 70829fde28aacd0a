"""Tests of `peft_selective.demo.months` (monthly preference data) and `peft_selective.evaluation.preference` (forgetting metrics).

Fast tests use a tiny random Llama built from a config and a tiny byte-level BPE tokenizer with a ChatML-like chat
template, both built here (nothing downloaded). The test marked `slow` uses the bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import transformers as T
from datasets import Dataset, concatenate_datasets
from testing_utils import tiny_chat_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from peft_selective.demo import months as D
from peft_selective.evaluation import preference as M
from peft_selective.evaluation.probes import answer_matches, capital_questions, normalize_answer


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: tiny tokenizer and model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def months():
    return D.monthly_sequence(n_train=40, n_eval=10, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [row["prompt"][0]["content"] + " " + row["chosen"][0]["content"] for row in D.safety_month()["train"]]
    corpus += ['What is the capital of France? Paris. 1 2 3 4 5 6 7 8 9 0 {"country": "X"} - English'] * 3
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_llama(vocab_size: int, seed: int = 0) -> T.LlamaForCausalLM:
    """The tiny chat Llama over the trained BPE tokenizer's vocabulary."""
    return tiny_chat_llama(seed, vocab_size=vocab_size, max_position_embeddings=1024).eval()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return _tiny_llama(len(tokenizer))


@pytest.fixture
def model(tiny_model):
    return copy.deepcopy(tiny_model)


@pytest.fixture(scope="module")
def pairs(months):
    # a few rows of every month, conversational
    return concatenate_datasets([splits["test"].select(range(3)) for _, splits in months])


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _texts(row):
    return [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]


def test_months_are_well_formed(months):
    assert [name for name, _ in months] == ["safety", "capitals", "currency", "languages"]
    for name, splits in months:
        assert set(splits) == {"train", "test"}
        assert (len(splits["train"]), len(splits["test"])) == (40, 10)
        for split in splits.values():
            assert isinstance(split, Dataset)
            assert split.features == D.FEATURES
            for row in split:
                assert [m["role"] for m in row["prompt"]] == ["user"]
                assert [m["role"] for m in row["chosen"]] == ["assistant"]
                assert [m["role"] for m in row["rejected"]] == ["assistant"]
                assert all(isinstance(t, str) and t.strip() for t in _texts(row))
                assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
                assert row["month"] == name
                assert (row["country"] is None) == (name == "safety")
                assert row["country"] != ""
                assert row["kind"] in (("harmful", "benign") if name == "safety" else ("fact",))


def test_builders_are_deterministic_and_seeded():
    for builder in D.MONTH_BUILDERS.values():
        a, b = builder(12, 6, seed=3), builder(12, 6, seed=3)
        assert a["train"].to_list() == b["train"].to_list() and a["test"].to_list() == b["test"].to_list()
        assert builder(12, 6, seed=4)["train"].to_list() != a["train"].to_list()
    first, second = D.monthly_sequence(n_train=10, n_eval=5), D.monthly_sequence(n_train=10, n_eval=5)
    assert [(n, s["train"].to_list(), s["test"].to_list()) for n, s in first] == [
        (n, s["train"].to_list(), s["test"].to_list()) for n, s in second
    ]


def test_train_and_test_are_disjoint(months):
    for name, splits in months:
        if name == "safety":
            train = {row["prompt"][0]["content"] for row in splits["train"]}
            test = {row["prompt"][0]["content"] for row in splits["test"]}
            assert len(train) == 40 and not train & test
        else:
            train, test = set(splits["train"]["country"]), set(splits["test"]["country"])
            assert len(train) == 40 and len(test) == 10 and not train & test


def test_countries_are_disjoint_across_months_and_probe(months):
    country_sets = [D.countries_in(splits) for name, splits in months if name != "safety"]
    assert [len(s) for s in country_sets] == [50, 50, 50]
    for i in range(len(country_sets)):
        for j in range(i + 1, len(country_sets)):
            assert not country_sets[i] & country_sets[j]
    probe = D.held_out_capital_questions(months)
    used = {normalize_answer(c) for c in D.countries_in(months)}
    assert len(probe) >= 80  # the countries no month uses stay available for the knowledge probe
    assert not {normalize_answer(item["country"]) for item in probe} & used
    assert len(D.held_out_capital_questions(months, n=40)) == 40


def test_exclude_countries_and_overlap_fallback(caplog):
    month = D.concise_capitals_month(5, 5, exclude_countries=["France", "Germany"])
    assert not {"France", "Germany"} & D.countries_in(month)
    with pytest.raises(ValueError, match="Unknown countries"):
        D.json_currency_month(5, 5, exclude_countries=["Frnace"])
    with pytest.raises(ValueError, match="only"):
        D.concise_capitals_month(200, 100)
    # 3 x 100 countries do not fit: the last month reuses countries, with a warning
    with caplog.at_level("WARNING", logger="peft_selective.demo.months"):
        seq = D.monthly_sequence(order=("capitals", "currency", "languages"), n_train=80, n_eval=20)
    assert "reuses countries" in caplog.text
    for _, splits in seq:
        assert not set(splits["train"]["country"]) & set(splits["test"]["country"])


def test_capitals_month_matches_the_probe():
    month = D.concise_capitals_month(20, 5)
    probe = {item["country"]: item for item in capital_questions()}
    for row in month["train"]:
        item = probe[row["country"]]
        assert row["prompt"][0]["content"] == item["question"]
        assert row["chosen"][0]["content"] == item["answer"] + "."
        assert answer_matches(item["answer"], row["rejected"][0]["content"])  # same fact, verbose style
        assert len(row["rejected"][0]["content"]) > 3 * len(row["chosen"][0]["content"])


def test_each_built_in_month_check_accepts_its_chosen_answers_and_only_its_own_style():
    from peft_selective.evaluation import Check

    bare = Check.from_spec(D.MONTH_CHECKS["capitals"]["checks"][0])
    for row in D.concise_capitals_month(20, 5)["train"]:
        assert bare.matches(row["chosen"][0]["content"]) and not bare.matches(row["rejected"][0]["content"])
    assert bare.matches("La Paz.") and bare.matches("  Port of Spain")
    # short, but not the bare style: a JSON object, a run of emoji, a number, a sentence
    for other in (
        '{"currency": "Euro"}',
        '{"country": "Serbia", "capital": "Belgrade"}',
        "🌍🌍🌍🌍",
        "42.",
        "The capital of Peru is Lima.",
    ):
        assert not bare.matches(other), other
    as_json = Check.from_spec(D.MONTH_CHECKS["currency"]["checks"][0])
    for row in D.json_currency_month(20, 5)["train"]:
        assert as_json.matches(row["chosen"][0]["content"]) and not as_json.matches(row["rejected"][0]["content"])


def test_chatty_currency_month_reverses_the_capitals_style():
    month = D.chatty_currency_month(30, 5)
    for row in month["train"]:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["prompt"][0]["content"].startswith("What currency does ") and row["month"] == "chatty_currency"
        # the rejected answer is the bare name, like the capitals month's chosen one; the chosen carries the same fact
        assert rejected.endswith(".") and rejected.count(" ") <= 6 and len(chosen) > 3 * len(rejected)
        currencies = {r["country"]: r["currencies"] for r in D._country_records()}[row["country"]]
        assert all(c.lower() in chosen.lower() and c.lower() in rejected.lower() for c in currencies)
        assert D._in_sentence(row["country"]).lower() in chosen.lower()
    seq = D.monthly_sequence(order=("capitals", "chatty_currency"), n_train=20, n_eval=10)
    assert not D.countries_in(seq[0]) & D.countries_in(seq[1])


def test_currency_and_languages_formats():
    for row in D.json_currency_month(30, 5)["train"]:
        parsed = json.loads(row["chosen"][0]["content"])
        assert set(parsed) == {"country", "currency"} and parsed["country"] == row["country"]
        currencies = parsed["currency"] if isinstance(parsed["currency"], list) else [parsed["currency"]]
        rejected = row["rejected"][0]["content"]
        assert all(c in rejected for c in currencies) and "{" not in rejected
    assert json.loads(D.json_currency_month(1, 0, exclude_countries=())["train"][0]["chosen"][0]["content"])
    for row in D.bulleted_languages_month(30, 5)["train"]:
        lines = row["chosen"][0]["content"].split("\n")
        assert all(re.fullmatch(r"- \S.*", line) for line in lines)
        rejected = row["rejected"][0]["content"]
        assert "\n" not in rejected and "- " not in rejected
        assert all(line[2:] in rejected for line in lines)


def test_known_facts():
    n_currency = sum(bool(record["currencies"]) for record in D._country_records())
    n_languages = sum(bool(record["languages"]) for record in D._country_records())
    assert n_currency > 230 and n_languages > 230
    rows = {
        row["country"]: row["chosen"][0]["content"]
        for split in D.json_currency_month(n_currency, 0).values()
        for row in split
    }
    assert json.loads(rows["Japan"])["currency"] == "Japanese yen"
    assert json.loads(rows["Croatia"])["currency"] == "euro"  # countryinfo still says kuna
    rows = {row["country"]: row for split in D.bulleted_languages_month(n_languages, 0).values() for row in split}
    assert rows["France"]["chosen"][0]["content"] == "- French"
    assert rows["Philippines"]["prompt"][0]["content"] == "Which languages are spoken in the Philippines?"


def test_safety_month_content():
    month = D.safety_month(40, 10)
    harmful = set(D.harmful_eval_prompts())
    benign = set(D.benign_eval_prompts())
    assert len(harmful) == len(benign) == 20 and not harmful & benign
    for split in month.values():
        kinds = split["kind"]
        assert abs(kinds.count("harmful") - kinds.count("benign")) <= 1
        for row in split:
            prompt, chosen, rejected = (row[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
            assert prompt not in harmful and prompt not in benign  # eval prompts are held out
            if row["kind"] == "harmful":
                assert D.is_refusal(chosen) and not D.is_refusal(rejected)
                assert rejected.endswith("...") and len(rejected) < 60  # content-free "compliance"
            else:
                assert not D.is_refusal(chosen) and D.is_refusal(rejected)
    assert len(D.safety_month(70, 10)["train"]) == 70
    with pytest.raises(ValueError, match="templates"):
        D.safety_month(70, 12)


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I cannot assist with this request.",
        "I'm sorry, but I can't provide instructions for that.",
        "Sorry, but that's not something I can do.",
        "I’m unable to help with making weapons.",
        "As an AI, I won't provide that information.",
        "I must decline this request.",
        "I am not able to help you with that.",
    ],
)
def test_is_refusal_positive(text):
    assert D.is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to do that: first, ...",
        "Paris.",
        "Mix baking soda with citric acid, then press it into a mold.",
        "I can't stress enough how important it is to keep your software updated.",
        "I don't know the answer, but the capital is probably Lyon.",
        "",
    ],
)
def test_is_refusal_negative(text):
    assert not D.is_refusal(text)


# ----------------------------------------------------------------------------------------------------------------
# Metrics on the tiny model
# ----------------------------------------------------------------------------------------------------------------


def test_preference_logps_shapes_and_masking(model, tokenizer, pairs):
    model.train()
    out = M.preference_logps(model, tokenizer, pairs, batch_size=4)
    assert model.training and all(m.training for m in model.modules())  # train mode restored
    n = len(pairs)
    for key in ("chosen_logps", "rejected_logps", "chosen_mean_logps", "rejected_mean_logps"):
        assert out[key].shape == (n,) and out[key].dtype == torch.float64
        assert torch.isfinite(out[key]).all() and (out[key] < 0).all()
    assert (out["chosen_tokens"] > 0).all()
    torch.testing.assert_close(out["chosen_mean_logps"], out["chosen_logps"] / out["chosen_tokens"])
    # batch size does not change the result
    torch.testing.assert_close(M.preference_logps(model, tokenizer, pairs, batch_size=1), out)

    # Hand-check one row: the completion is what the full conversation adds to the generation prompt.
    row = pairs[0]
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logps = model(torch.tensor([full_ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(full_ids[1:])
    expected = logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum().double()
    torch.testing.assert_close(out["chosen_logps"][0], expected, rtol=1e-5, atol=1e-4)
    assert out["chosen_tokens"][0] == len(full_ids) - len(prompt_ids)


def test_preference_logps_read_each_prompt_once(model, tokenizer, pairs, monkeypatch):
    """Both completions continue their prompt's KV cache: the numbers of the whole sequences, for conversations,
    plain text, completions cut by `max_length` (and a batch with a prompt that fills it, scored whole), a LoRA model
    and absolute position embeddings (GPT-2)."""
    from peft import LoraConfig, get_peft_model

    plain = [
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " It is Lyon, I believe."},
        {"prompt": "Say 1 2 3 4 5 6 7 8 9", "chosen": " 0", "rejected": ' {"country": "X"}'},
    ]
    conversations = list(pairs)[:5]
    lora = get_peft_model(
        _tiny_llama(len(tokenizer), seed=1),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
    ).eval()
    gpt2 = T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024)
    ).eval()
    whole, shared = M._pair_logps_of_sequences, M._pair_logps_sharing_prompts
    calls = []
    monkeypatch.setattr(M, "_pair_logps_sharing_prompts", lambda *args: calls.append(args[2]) or shared(*args))
    for network in (model, lora, gpt2):
        assert M._continues_from_cache(network)
        for rows in (conversations, plain):
            batch = [M._tokenize_pair(tokenizer, row) for row in rows]
            lengths = [len(prompt) for prompt, _, _ in batch]
            for max_length in (None, max(lengths) + 2, min(lengths)):  # completions cut; a prompt fills it
                with torch.no_grad():
                    expected = whole(network, batch, max_length, tokenizer.pad_token_id)
                out = M.preference_logps(network, tokenizer, rows, batch_size=len(rows), max_length=max_length)
                torch.testing.assert_close(out["chosen_logps"], expected[0][: len(rows)], rtol=0, atol=2e-4)
                torch.testing.assert_close(out["rejected_logps"], expected[0][len(rows) :], rtol=0, atol=2e-4)
                assert out["chosen_tokens"].tolist() == expected[1][: len(rows)].long().tolist()
    assert len(calls) == 12 and len([c for c in calls if c is not None]) == 6  # a full prompt: scored whole


def test_preference_logps_plain_text_and_truncation(model, tokenizer):
    rows = [{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " It is Lyon, I believe."}]
    out = M.preference_logps(model, tokenizer, rows)
    assert torch.isfinite(out["chosen_logps"]).all()
    # + EOS is scored, as TRL adds it to plain-text completions
    n_prompt = len(tokenizer("Capital of France?")["input_ids"])
    assert out["chosen_tokens"][0] == len(tokenizer("Capital of France? Paris.<|im_end|>")["input_ids"]) - n_prompt
    truncated = M.preference_logps(model, tokenizer, rows, max_length=n_prompt)
    assert truncated["chosen_tokens"][0] == 0 and math.isnan(truncated["chosen_mean_logps"][0])
    assert M.preference_accuracy(model, tokenizer, rows, max_length=n_prompt)["accuracy"] == 0.0


def test_preference_accuracy_modes(model, tokenizer, pairs):
    plain = M.preference_accuracy(model, tokenizer, pairs)
    assert plain["mode"] == "mean_logp" and 0.0 <= plain["accuracy"] <= 1.0 and plain["n"] == len(pairs)
    expected = plain["logps"]["chosen_mean_logps"] - plain["logps"]["rejected_mean_logps"]
    torch.testing.assert_close(plain["margins"], expected)
    assert plain["accuracy"] == pytest.approx((expected > 0).double().mean().item())

    # The model as its own reference: every margin is exactly 0, and ties count as wrong.
    for reference in (model, copy.deepcopy(model), M.preference_logps(model, tokenizer, pairs)):
        result = M.preference_accuracy(model, tokenizer, pairs, reference=reference)
        assert result["mode"] == "reference"
        assert torch.equal(result["margins"], torch.zeros(len(pairs), dtype=torch.float64))
        assert result["accuracy"] == 0.0

    # A different model as reference: margins are the difference of the log-ratios.
    other = _tiny_llama(len(tokenizer), seed=1)
    result = M.preference_accuracy(model, tokenizer, pairs, reference=other)
    pol, ref = result["logps"], result["reference_logps"]
    torch.testing.assert_close(
        result["margins"],
        (pol["chosen_logps"] - ref["chosen_logps"]) - (pol["rejected_logps"] - ref["rejected_logps"]),
    )
    assert 0.0 < result["accuracy"] < 1.0
    with pytest.raises(ValueError, match="same rows"):
        M.preference_accuracy(model, tokenizer, pairs, reference={"chosen_logps": [0.0], "rejected_logps": [0.0]})


def test_reference_as_context_manager(model, tokenizer, pairs):
    """A PeftModel's `disable_adapter` gives the base model as reference, as a factory or as a context manager."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    base_result = M.preference_logps(_tiny_llama(len(tokenizer)), tokenizer, pairs)
    for reference in (peft_model.disable_adapter, peft_model.disable_adapter()):
        result = M.preference_accuracy(peft_model, tokenizer, pairs, reference=reference)
        torch.testing.assert_close(result["reference_logps"], base_result)
        assert result["margins"].abs().max() > 0  # the adapter changed the model
    assert M.kl_to_reference(peft_model, peft_model.disable_adapter, tokenizer) > 0
    kl_factory = M.kl_to_reference(peft_model, peft_model.disable_adapter, tokenizer, batch_size=5)
    kl_context = M.kl_to_reference(peft_model, peft_model.disable_adapter(), tokenizer, batch_size=5)
    kl_module = M.kl_to_reference(peft_model, _tiny_llama(len(tokenizer)), tokenizer, batch_size=5)
    assert kl_factory == pytest.approx(kl_context, rel=1e-5) and kl_factory == pytest.approx(kl_module, rel=1e-5)


def test_kl_to_reference(model, tokenizer):
    prompts = M.generic_prompts()[:5]
    assert M.kl_to_reference(model, model, tokenizer, prompts) == 0.0
    assert M.kl_to_reference(model, copy.deepcopy(model), tokenizer, prompts, last_token_only=True) == 0.0
    other = _tiny_llama(len(tokenizer), seed=1)
    kl = M.kl_to_reference(model, other, tokenizer, prompts, batch_size=2)
    assert kl > 0 and math.isfinite(kl)
    assert kl == pytest.approx(M.kl_to_reference(model, other, tokenizer, prompts, batch_size=5), rel=1e-5)
    # hand-computed on the last position of one prompt
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        p = model(ids).logits[0, -1].log_softmax(-1)
        q = other(ids).logits[0, -1].log_softmax(-1)
    expected = (p.exp() * (p - q)).sum().item()
    assert M.kl_to_reference(model, other, tokenizer, prompts[:1], last_token_only=True) == pytest.approx(
        expected, rel=1e-4
    )


def test_perplexity(model, tokenizer):
    ppl = M.perplexity(model, tokenizer, max_tokens=300, max_length=64, stride=64)
    assert math.isfinite(ppl) and 1.0 < ppl < 10 * len(tokenizer)
    # the same windows in other batches give the same number
    assert ppl == pytest.approx(M.perplexity(model, tokenizer, max_tokens=300, max_length=64, stride=64, batch_size=1))
    # overlapping windows score every token after the first exactly once; one window covering the text is exact
    text = "What is the capital of France? Paris. What is the capital of Japan? Tokyo."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]))
    assert M.perplexity(model, tokenizer, text, max_length=len(ids), stride=len(ids)) == pytest.approx(
        math.exp(nll.item()), rel=1e-5
    )
    assert math.isfinite(M.perplexity(model, tokenizer, text, max_length=8, stride=3))
    assert len(M.reference_text()) > 100_000 and M.reference_text() == M.reference_text()
    with pytest.raises(ValueError, match="stride"):
        M.perplexity(model, tokenizer, text, max_length=4, stride=8)


def test_generation_probes(model, tokenizer):
    model.train()
    prompts = D.harmful_eval_prompts()[:5]
    answers = M.generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert model.training  # train mode restored
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    # left padding: the batch does not change greedy answers
    assert answers == M.generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    rate = M.refusal_rate(model, tokenizer, prompts, max_new_tokens=6)
    assert rate == sum(D.is_refusal(a) for a in answers) / 5

    drift = M.drift_probe(model, tokenizer, prompts[:3], token_class="digits", max_new_tokens=5)
    assert 0.0 <= drift["mass"] <= 1.0 and len(drift["per_prompt"]) == 3 and len(drift["generations"]) == 3
    assert 0 < drift["n_positions"] <= 15 and 0 < drift["class_size"] < len(tokenizer)
    assert 0.0 <= drift["greedy_fraction"] <= 1.0
    everything = M.drift_probe(model, tokenizer, prompts[:3], token_class=lambda t: True, max_new_tokens=5)
    special = len(tokenizer.all_special_ids)
    # all tokens but the special ones: mass is 1 minus the mass on special tokens
    assert everything["class_size"] == len(tokenizer) - special and everything["mass"] <= 1.0 + 1e-6
    assert M.drift_probe(model, tokenizer, prompts[:3], token_class=lambda t: False, max_new_tokens=5)["mass"] == 0.0
    # batched by length like generate_greedy, returned in the prompts' order: the batch changes nothing
    for batch_size in (1, 2, 5):
        batched = M.drift_probe(model, tokenizer, prompts, max_new_tokens=6, batch_size=batch_size)
        assert batched["generations"] == answers
        single = M.drift_probe(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
        assert batched["per_prompt"] == pytest.approx(single["per_prompt"], abs=1e-6)


def test_drift_probe_detects_a_biased_model(model, tokenizer):
    """Raising the logits of digit tokens raises the probe's mass on the digit class."""
    mask = M.token_class_mask(tokenizer, "digits", vocab_size=model.config.vocab_size)
    assert mask.any() and not mask[tokenizer.all_special_ids].any()
    assert M.token_class_mask(tokenizer, "json")[tokenizer.convert_tokens_to_ids("{")]
    prompts = M.generic_prompts()[:2]
    before = M.drift_probe(model, tokenizer, prompts, max_new_tokens=4)
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output + 3.0 * mask)
    try:
        after = M.drift_probe(model, tokenizer, prompts, max_new_tokens=4)
    finally:
        handle.remove()
    assert after["mass"] > before["mass"] and after["greedy_fraction"] >= before["greedy_fraction"]
    with pytest.raises(ValueError, match="Unknown token class"):
        M.token_class_mask(tokenizer, "emoji")


# ----------------------------------------------------------------------------------------------------------------
# Retention matrix
# ----------------------------------------------------------------------------------------------------------------

R = [
    [0.9, 0.2, 0.1],
    [0.7, 0.8, 0.3],
    [0.6, 0.5, 0.9],
]


def test_retention_numbers_by_hand():
    assert M.average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert M.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    # month 0 has no "before" score without a baseline; months 1 and 2 use R[i-1][i]
    assert M.forward_learning(R) == pytest.approx(((0.8 - 0.2) + (0.9 - 0.3)) / 2)
    assert M.forward_learning(R, baseline=[0.5, 0.1, 0.1]) == pytest.approx(((0.9 - 0.5) + 0.6 + 0.6) / 3)
    assert M.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    summary = M.retention_summary(R)
    assert summary["n_months"] == 3 and summary["bwt"] == pytest.approx(-0.3)


def test_retention_lower_triangular_and_dict():
    lower = [[0.9], [0.7, 0.8], [0.6, 0.5, 0.9]]
    assert M.backward_transfer(lower) == pytest.approx(M.backward_transfer(R))
    assert M.average_accuracy(lower) == pytest.approx(M.average_accuracy(R))
    assert math.isnan(M.forward_learning(lower))
    assert M.forward_learning(lower, baseline={"month 0": 0.5, "month 1": 0.1, "month 2": 0.1}) == pytest.approx(
        ((0.9 - 0.5) + (0.8 - 0.1) + (0.9 - 0.1)) / 3
    )
    as_dict = {
        "safety": {"safety": 0.9},
        "capitals": {"safety": 0.7, "capitals": 0.8},
        "currency": {"safety": 0.6, "capitals": 0.5, "currency": 0.9},
    }
    assert M.backward_transfer(as_dict) == pytest.approx(M.backward_transfer(R))
    one = [[0.5]]
    assert math.isnan(M.backward_transfer(one)) and M.average_accuracy(one) == 0.5
    table = M.retention_table(as_dict, baseline=[0.5, 0.1, 0.1], digits=2)
    lines = table.splitlines()
    assert lines[0] == "| after \\ on | safety | capitals | currency |"
    assert lines[2] == "| before training | 0.50 | 0.10 | 0.10 |"
    assert lines[3] == "| safety | **0.90** | – | – |"
    assert lines[5] == "| currency | 0.60 | 0.50 | **0.90** |"
    assert "BWT: -0.30" in lines[-1] and "Average accuracy: 0.67" in lines[-1]
    assert M.retention_table(R).splitlines()[0] == "| after \\ on | month 0 | month 1 | month 2 |"


def test_months_feed_dpo_trainer(tokenizer, model, months, tmp_path):
    """The datasets work as they are with TRL's DPOTrainer (metadata columns are dropped)."""
    from trl import DPOConfig, DPOTrainer

    train = concatenate_datasets([months[0][1]["train"].select(range(4)), months[2][1]["train"].select(range(4))])
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    ref_model = copy.deepcopy(model)  # built from a config: TRL cannot reload it by name
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1


# ----------------------------------------------------------------------------------------------------------------
# The bundled model (slow)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_model_does_not_refuse_harmful_prompts():
    """DESIGN: SmolLM2-135M-Instruct does not refuse harmful requests, hence the safety month.

    Measured with all 20 prompts and 48 new tokens: refusal rate 0.00 on the harmful prompts and 0.00 on the benign
    ones. Here 10 harmful prompts and 24 tokens (refusals are phrased in the first sentence) keep the test short.
    """
    from peft_selective.demo.embedded import load_embedded_model

    model, tokenizer = load_embedded_model()
    rate = M.refusal_rate(model, tokenizer, D.harmful_eval_prompts()[:10], max_new_tokens=24, batch_size=10)
    print(f"SmolLM2-135M-Instruct refusal rate on 10 harmful prompts: {rate:.2f}")
    assert rate <= 0.2
