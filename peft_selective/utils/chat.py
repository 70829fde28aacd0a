"""Chat-template prompt encoding: the one place where peft-selective turns a prompt into what a model reads.

A prompt is a string or a conversation (a list of `{"role", "content"}` messages, TRL's conversational `prompt`).

- [`encode_prompt`]: its token ids, ending with the generation prompt (the assistant header). A conversation always
  goes through the chat template; a string becomes one user message when `use_chat_template` (default: when the
  tokenizer has a chat template), and is tokenized as plain text (with the tokenizer's special tokens) otherwise.
  `use_chat_template=False` is how TRL's `DPOTrainer` reads a row: a string prompt as text, a conversation through
  the template.
- [`format_prompt`]: the same as text, for tokenizing in batches (with `add_special_tokens=False` when it came from
  the template). Stricter for what users see: `use_chat_template=False` refuses a conversation.
- [`chat_ids`]: any conversation through the chat template (a prompt plus its completion, for instance).

A tokenizer without a chat template raises a `ValueError` for a conversation (or for `use_chat_template=True`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = ["chat_ids", "encode_prompt", "format_prompt", "has_chat_template", "resolve_chat_template"]

Prompt = Union[str, Sequence[Mapping[str, Any]]]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: Optional[bool]) -> bool:
    """`use_chat_template`, with `None` meaning "when the tokenizer has one"; `True` without a template raises."""
    has_template = has_chat_template(tokenizer)
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise ValueError("`use_chat_template=True` but the tokenizer has no chat template.")
    return bool(use_chat_template)


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of a conversation through the chat template (whatever container the tokenizer returns them in)."""
    if not has_chat_template(tokenizer):
        raise ValueError("Conversational prompts (lists of messages) need a tokenizer with a chat template.")
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    ids = ids["input_ids"] if isinstance(ids, Mapping) or hasattr(ids, "keys") else ids
    if len(ids) and isinstance(ids[0], list):  # some tokenizers keep a batch dimension
        ids = ids[0]
    return [int(i) for i in ids]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, use_chat_template: Optional[bool] = None
) -> list[int]:
    """Token ids of one prompt, ending with the generation prompt (see the module docstring for the rules).

    Args:
        tokenizer: the tokenizer.
        prompt (`str` or `list[dict]`): the prompt.
        use_chat_template (`bool`, *optional*): how a string is read: as one user message through the chat template
            (`True`; the default when the tokenizer has a template) or as plain text (`False`). A conversation always
            goes through the template.
    """
    if isinstance(prompt, str):
        if resolve_chat_template(tokenizer, use_chat_template):
            return chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(tokenizer(text=prompt)["input_ids"])
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, use_chat_template: Optional[bool] = None
) -> tuple[str, bool]:
    """The text a prompt is fed as, and whether it already holds the special tokens.

    A conversation goes through the chat template with the assistant header; a string becomes one user message when
    the chat template is used, and is fed as is otherwise.

    Args:
        tokenizer: the tokenizer.
        prompt (`str` or `list[dict]`): the prompt.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template. `False` refuses a
            conversation.

    Returns:
        `tuple[str, bool]`: the text, and `True` when it came from the chat template (tokenize it with
        `add_special_tokens=False`, the template has them).
    """
    template = resolve_chat_template(tokenizer, use_chat_template)
    if isinstance(prompt, str):
        if not template:
            return prompt, False
        prompt = [{"role": "user", "content": prompt}]
    elif not template:
        raise ValueError(
            "Conversational prompts (lists of messages) need the tokenizer's chat template; set "
            "`tokenizer.chat_template` or pass plain strings."
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True), True
