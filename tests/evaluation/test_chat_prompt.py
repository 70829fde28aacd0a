"""`peft_selective.utils.chat`: the one prompt encoding the anchors, the evaluation and the trainer share."""

from __future__ import annotations

import copy

import pytest
from testing_utils import word_chat_tokenizer

from peft_selective.utils.chat import chat_ids, encode_prompt, format_prompt, resolve_chat_template


def _plain_tokenizer():
    tokenizer = copy.deepcopy(word_chat_tokenizer())
    tokenizer.chat_template = None
    return tokenizer


def test_string_prompt_through_the_template_or_as_text():
    tokenizer = word_chat_tokenizer()
    messages = [{"role": "user", "content": "what is the capital"}]
    templated = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert encode_prompt(tokenizer, "what is the capital") == list(templated["input_ids"])
    assert encode_prompt(tokenizer, messages) == list(templated["input_ids"])
    # use_chat_template=False: a string as plain text (TRL's reading), a conversation still through the template
    assert encode_prompt(tokenizer, "what is the capital", use_chat_template=False) == list(
        tokenizer(text="what is the capital")["input_ids"]
    )
    assert encode_prompt(tokenizer, messages, use_chat_template=False) == list(templated["input_ids"])
    text, templated_text = format_prompt(tokenizer, "what is the capital")
    assert templated_text and tokenizer(text, add_special_tokens=False)["input_ids"] == list(templated["input_ids"])


def test_tokenizer_without_chat_template():
    tokenizer = _plain_tokenizer()
    assert not resolve_chat_template(tokenizer, None)
    assert encode_prompt(tokenizer, "good answer") == list(tokenizer(text="good answer")["input_ids"])
    assert format_prompt(tokenizer, "good answer") == ("good answer", False)
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "good"}])
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(tokenizer, "good", use_chat_template=True)
    with pytest.raises(ValueError, match="need the tokenizer's chat template"):
        format_prompt(word_chat_tokenizer(), [{"role": "user", "content": "good"}], use_chat_template=False)
    with pytest.raises(ValueError, match="chat template"):
        chat_ids(tokenizer, [{"role": "user", "content": "good"}])
