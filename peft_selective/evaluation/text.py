"""Text helpers shared by the behavioural checks: the answer of a TRL value, tokens, JSON in a generation."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = ["parse_json", "response_text", "style_tokens"]


def response_text(value: Any) -> str:
    """The answer text of a TRL value: a string as is, a message's `content`, or the last assistant message's content.

    TRL's conversational preference rows hold `chosen` / `rejected` as lists of messages
    (`[{"role": "assistant", "content": "Paris."}]`); a list without an assistant message gives its last message's
    content.

    Args:
        value (`str`, `dict` or `list[dict]`): a plain string, a message, or a list of messages.

    Returns:
        `str`
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        if isinstance(content, list):  # multimodal content parts: keep the text ones
            return " ".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return "" if content is None else str(content)
    if isinstance(value, Sequence) and value and all(isinstance(message, Mapping) for message in value):
        assistant = [message for message in value if message.get("role") == "assistant"]
        return response_text((assistant or list(value))[-1])
    if isinstance(value, Sequence) and not value:
        return ""
    raise TypeError(f"Expected a string or a list of messages, got {type(value).__name__}.")


# Letters NFKD does not decompose (as in `peft_selective.evaluation.probes.normalize_answer`).
_EXTRA_FOLDS = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"})
# A word, or one punctuation character, or a line break: punctuation and line breaks carry style (JSON braces, list
# bullets, a leading "+"), so unlike answer matching they are kept as tokens.
_TOKEN = re.compile(r"\w+|\n|[^\w\s]")


def style_tokens(text: str) -> list[str]:
    """Tokens of a text for style comparisons: casefolded, accent-free words, single punctuation marks, and `"\\n"`.

    Example: `'{"capital": "Bogotá"}'` -> `['{', '"', 'capital', '"', ':', '"', 'bogota', '"', '}']`.

    Args:
        text (`str`): the text.

    Returns:
        `list[str]`
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in text if not unicodedata.combining(char)).casefold().translate(_EXTRA_FOLDS)
    text = re.sub(r"\n\s*", "\n", text.strip())  # one line break token per line, whatever the indentation
    return _TOKEN.findall(text)


_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_json(text: str) -> tuple[bool, Any]:
    """Parse a whole generation as JSON.

    Surrounding whitespace and one enclosing Markdown code fence (```` ```json ... ``` ````) are removed first; JSON
    embedded in prose ("Here it is: {...}") does not count, since answering in JSON is the behaviour being checked.

    Args:
        text (`str`): the generation.

    Returns:
        `tuple[bool, Any]`: `(True, value)` when it parses, `(False, None)` otherwise.
    """
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None
