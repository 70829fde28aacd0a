"""Checks of preference data before `DPOTrainer` tokenizes it: clear errors that name the row, instead of a
`KeyError` deep inside `datasets.map` or rows silently dropped.

TRL accepts the standard format (`prompt`, `chosen`, `rejected`) and the implicit-prompt one (`chosen`, `rejected`
only, the prompt being their shared start), each either plain text or conversational (lists of
`{"role", "content"}` messages). Every row must use the same format as the first one.

Conversational messages are checked only as far as TRL's chat templates need them: a `role`, and some content. As in
TRL's own tool-calling datasets, an assistant message may carry `tool_calls` and no `content` (or `content: None`),
and `content` may be a list of parts (`[{"type": "text", "text": ...}]`, vision-language data). Extra keys
(`tool_call_id`, `name`, `reasoning_content`, ...) and extra columns (`tools`, `chat_template_kwargs`, `images`) are
passed through untouched.

This is the one preference-row schema of the package: [`validate_preference_dataset`] checks a whole dataset (the
trainer runs it once, unless the caller passes a dataset it already validated), [`preference_row_problem`] /
[`check_preference_row`] one row (the rehearsal buffer checks the rows it stores, and reloads, with them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, IterableDataset


class PreferenceDataError(ValueError):
    """Malformed preference data; the message names the dataset, the row and the fix."""


#: How many offending rows an error message lists.
_SHOWN = 5
#: The DPO columns of TRL: `prompt` is optional (the implicit-prompt format keeps it inside `chosen` / `rejected`).
_FIELDS = ("prompt", "chosen", "rejected")
_REQUIRED = ("chosen", "rejected")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_messages(value: Any) -> str | None:
    if not value:
        return "is an empty list of messages"
    for message in value:
        if not isinstance(message, dict) or "role" not in message:
            return f"has a message that is not a {{'role', 'content'}} dict: {_describe(message)}"
        if message.get("tool_calls"):
            continue  # a tool call is the message's content (TRL's tool-calling format has no `content` here)
        if "content" not in message:
            return f"has a {message['role']!r} message with neither 'content' nor 'tool_calls': {_describe(message)}"
        if _is_empty_content(message["content"]):
            return f"has a {message['role']!r} message with empty content"
    return None


def _is_empty_content(content: Any) -> bool:
    """Empty text, `None`, or a list of parts none of which carries text or another modality."""
    if content is None:
        return True
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, list):  # multimodal parts: {"type": "text", "text": ...} or {"type": "image", ...}
        return not any(
            not isinstance(part, dict) or part.get("type") != "text" or str(part.get("text") or "").strip()
            for part in content
        )
    return False


def _field_problem(value: Any, conversational: bool, basis: str = "the dataset is {kind} (first row)") -> str | None:
    if value is None:
        return "is missing (None)"
    if conversational:
        if not isinstance(value, list):
            reason = basis.format(kind="conversational")
            return f"is a {type(value).__name__}, but {reason}: expected a list of messages"
        return _check_messages(value)
    if not isinstance(value, str):
        kind = "a list of messages" if isinstance(value, list) else f"a {type(value).__name__}"
        return f"is {kind}, but {basis.format(kind='plain text')}: expected a string"
    if not value.strip():
        return "is an empty string"
    return None


def preference_row_problem(row: Any, conversational: bool | None = None) -> str | None:
    """Why `row` is not a valid preference row, or `None` when it is.

    Args:
        row: a row dict with `chosen`, `rejected` and usually `prompt`.
        conversational (`bool`, *optional*): the format the row must have (that of the dataset's first row); `None`
            takes the row's own (`chosen` a list of messages or not).
    """
    if not isinstance(row, Mapping):
        return f"is a {type(row).__name__}, not a row dict"
    missing = [column for column in _REQUIRED if column not in row]
    if missing:
        return f"is missing the DPO columns {missing} (the row has {list(row)})"
    basis = "the dataset is {kind} (first row)"
    if conversational is None:
        conversational = isinstance(row.get("chosen"), list)
        basis = "the row's 'chosen' is {kind}"
    for field in _FIELDS:
        if field in row:
            problem = _field_problem(row[field], conversational, basis)
            if problem:
                return f"{field!r} {problem}"
    if row["chosen"] == row["rejected"]:
        return f"'chosen' and 'rejected' are identical ({_describe(row['chosen'])})"
    return None


def check_preference_row(row: Any, where: str, conversational: bool | None = None) -> None:
    """Raise [`PreferenceDataError`] (`"<where>: <problem>"`) when `row` is not a valid preference row (see
    [`preference_row_problem`])."""
    problem = preference_row_problem(row, conversational)
    if problem is not None:
        raise PreferenceDataError(f"{where}: {problem}.")


def validate_preference_dataset(
    dataset: Dataset | IterableDataset, name: str = "train", row_names: Sequence[str] | None = None
) -> int:
    """Check every row of a map-style dataset (an `IterableDataset` only has its first row checked, since reading it
    would consume it); raise [`PreferenceDataError`] naming the offending rows. Returns the number of rows.

    Args:
        dataset: the preference dataset.
        name (`str`): how the error names the dataset (`"The train dataset ..."`).
        row_names (`Sequence[str]`, *optional*): how the error names each row of a map-style dataset, e.g.
            `"june.jsonl, line 4"` for rows read from a file (the campaign does); default `"row <index>"`.
    """
    if isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        if first is None:
            raise PreferenceDataError(f"The {name} dataset is empty: DPO needs preference pairs.")
        _check_columns(list(first.keys()), name)
        _check_rows([first], name)
        return -1
    if not isinstance(dataset, Dataset):
        raise PreferenceDataError(f"The {name} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise PreferenceDataError(f"The {name} dataset is empty: DPO needs preference pairs.")
    _check_columns(dataset.column_names, name)
    if "input_ids" in dataset.column_names or "chosen_ids" in dataset.column_names:
        return len(dataset)  # already tokenized: TRL leaves it as it is
    _check_rows(dataset, name, row_names)
    return len(dataset)


def _check_columns(columns: Sequence[str], name: str) -> None:
    if "chosen_ids" in columns and "rejected_ids" in columns:
        return
    missing = [column for column in ("chosen", "rejected") if column not in columns]
    if missing:
        raise PreferenceDataError(
            f"The {name} dataset has no {' or '.join(repr(c) for c in missing)} column (it has {list(columns)}). A "
            "preference dataset needs 'chosen' and 'rejected', and usually 'prompt': rename your columns, e.g. "
            "`dataset.rename_column('response_good', 'chosen')`."
        )


def _check_rows(rows: Any, name: str, row_names: Sequence[str] | None = None) -> None:
    problems: list[str] = []
    conversational = None
    for index, row in enumerate(rows):
        if conversational is None and row.get("chosen") is not None:  # the first row that has a 'chosen' sets it
            conversational = isinstance(row["chosen"], list)
        problem = preference_row_problem(row, conversational)
        if problem:
            problems.append(f"{row_names[index] if row_names is not None else f'row {index}'}: {problem}")
        if len(problems) > _SHOWN:
            break
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = " (and more)" if len(problems) > _SHOWN else ""
        fix = (
            "Fix or remove these rows"
            if row_names is not None
            else "Fix or filter these rows, e.g. `dataset.filter(lambda row: row['chosen'] and row['rejected'])`"
        )
        raise PreferenceDataError(
            f"The {name} dataset has malformed preference rows{more}:\n  {shown}\n{fix}; nothing was dropped."
        )
