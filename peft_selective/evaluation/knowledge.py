"""Does the model still know facts? Multiple-choice likelihood and exact match on held-out knowledge items.

Two views of the same items, both reported with 95% intervals by the callers:

- [`multiple_choice_accuracy`]: for each question, the option the model finds most likely as the answer (mean
  log-probability per token, so long options are not penalised for their length). It sees knowledge that greedy
  generation hides behind a learned style ("Paris." vs a sentence), and small models get a readable signal from it.
- [`exact_match`]: whether a generated answer names the right answer ([`extract_answer`] reads JSON, bullet lists and
  sentences).

Items must not overlap what the model was trained on, or the probe measures memorised training data:
[`check_no_overlap`] fails loudly when they do. The countryinfo default set is built by `peft_selective.demo.months.knowledge_items`,
next to the monthly data it must be disjoint from.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from tqdm.auto import tqdm

from .generation import (
    _continues_from_cache,
    _forward_parameters,
    _model_device,
    format_prompt,
    forward_after_cached_prefixes,
)
from .intervals import Estimate, bootstrap_rate
from .probes import normalize_answer
from .text import parse_json, response_text


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = [
    "KnowledgeItem",
    "check_no_overlap",
    "exact_match",
    "extract_answer",
    "multiple_choice_accuracy",
    "option_scores",
]


@dataclass(frozen=True)
class KnowledgeItem:
    """A factual question with its answer and wrong options.

    Args:
        question (`str`): e.g. `"What is the capital of France?"`.
        answer (`str`): e.g. `"Paris"`.
        distractors (`tuple[str, ...]`): wrong options, e.g. `("Lyon", "Brussels", "Madrid")`.
        aliases (`tuple[str, ...]`, defaults to `()`): other accepted spellings of the answer (exact match only).
        entity (`str`, *optional*): what the question is about (e.g. `"France"`); [`check_no_overlap`] then also
            fails when a training prompt is about it.
    """

    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    entity: Optional[str] = None

    def __post_init__(self) -> None:
        # Tuples even when lists are passed: items are hashable and cannot be changed behind a result's back.
        object.__setattr__(self, "distractors", tuple(self.distractors))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def options(self) -> tuple[str, ...]:
        """The answer first, then the distractors."""
        return (self.answer, *self.distractors)


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------------------------


def _option_ids(
    tokenizer: PreTrainedTokenizerBase, item: KnowledgeItem, use_chat_template: Optional[bool]
) -> tuple[list[int], list[list[int]]]:
    """The question's prompt ids, and each option's answer ids (tokenized alone, so every option sees the same
    prompt tokens whatever its first characters)."""
    prompt, templated = format_prompt(tokenizer, item.question, use_chat_template)
    if not templated:
        prompt = f"Question: {item.question}\nAnswer:"
    prompt_ids = list(tokenizer(prompt, add_special_tokens=not templated)["input_ids"])
    separator = "" if templated else " "
    options = [list(tokenizer(separator + option, add_special_tokens=False)["input_ids"]) for option in item.options]
    return prompt_ids, options


def option_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[KnowledgeItem],
    batch_size: int = 32,
    use_chat_template: Optional[bool] = None,
    disable_tqdm: bool = True,
) -> list[list[float]]:
    """Mean log-probability per token of each option given its question, for every item.

    The question is asked as one user message through the chat template (with the assistant header) when the
    tokenizer has one, else as `"Question: ...\\nAnswer:"`; the option's tokens follow it directly (after a space
    without a template). Runs under `torch.no_grad()` in eval mode, restoring every module's train/eval state.

    Each question is read once for all its options: the tokens every question starts with (a chat template's system
    prompt) go through the model once, each question's own tokens once per item, and the options continue from their
    question's KV cache (a quarter of the tokens of scoring question + option sequences with 4 options, and logits
    only where an option token is scored). The numbers are those of the full sequences, up to float rounding. Models
    that cannot continue from a cache with explicit positions (prompt-learning PEFT adapters, forwards without
    `past_key_values` / `position_ids`) score each question + option sequence whole.

    Args:
        model: a causal LM. tokenizer: its tokenizer.
        items (`Sequence[KnowledgeItem]`): the questions.
        batch_size (`int`, defaults to 32): options (question + option) per forward pass.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.
        disable_tqdm (`bool`, defaults to `True`): hide the progress bar.

    Returns:
        `list[list[float]]`: per item, the scores of [`KnowledgeItem.options`] (answer first).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    prepared = []  # per item: (prompt ids, [option ids])
    for item in items:
        prompt_ids, options = _option_ids(tokenizer, item, use_chat_template)
        for j, option_ids in enumerate(options):
            if not option_ids:
                raise ValueError(f"Option {item.options[j]!r} of {item.question!r} tokenizes to nothing.")
        prepared.append((prompt_ids, options))
    scores = [[0.0] * len(item.options) for item in items]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    total = sum(len(options) for _, options in prepared)
    try:
        with torch.no_grad(), tqdm(total=total, desc="Knowledge (multiple choice)", disable=disable_tqdm) as progress:
            if _continues_from_cache(model) and prepared:
                _scores_sharing_prompts(model, prepared, batch_size, pad_id, scores, progress)
            else:
                _scores_of_sequences(model, prepared, batch_size, pad_id, scores, progress)
    finally:
        for module, training in modes.items():
            module.training = training
    return scores


def _scores_of_sequences(model, prepared, batch_size, pad_id, scores, progress) -> None:
    """Score every question + option sequence whole (right padding), similar lengths batched together."""
    device = _model_device(model)
    sequences = [
        (i, j, prompt, option) for i, (prompt, options) in enumerate(prepared) for j, option in enumerate(options)
    ]
    sequences.sort(key=lambda s: len(s[2]) + len(s[3]))
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        length = max(len(p) + len(o) for _, _, p, o in batch)
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        target_mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, (_, _, prompt_ids, option_ids) in enumerate(batch):
            ids = prompt_ids + option_ids  # right padding: positions start at 0 in every row
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            target_mask[row, len(prompt_ids) : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        # Token t is predicted at position t - 1.
        logps = logits[:, :-1].float().log_softmax(-1).cpu()
        token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = target_mask[:, 1:]
        means = (token_logps * mask).sum(-1) / mask.sum(-1)
        for row, (i, j, _, _) in enumerate(batch):
            scores[i][j] = means[row].item()
        progress.update(len(batch))


def _scores_sharing_prompts(model, prepared, batch_size, pad_id, scores, progress) -> None:
    """Score the options continuing their question's KV cache: the common prefix of all questions once, then per
    batch of items their own question tokens (left-padded to end together), then their options (right-padded)."""
    device = _model_device(model)
    keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
    prompts = [prompt for prompt, _ in prepared]
    # Every question keeps at least one own token: its last position's logits score the option's first token.
    shared = min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        shared = min(shared, next((k for k, (a, b) in enumerate(zip(prompts[0], prompt)) if a != b), shared))
    prefix_cache = None
    if shared > 0:
        prefix = torch.tensor([prompts[0][:shared]], device=device)
        prefix_cache = model(input_ids=prefix, use_cache=True, **keep_logits).past_key_values

    # Items of similar question lengths together, up to `batch_size` options a batch (at least one item).
    order = sorted(range(len(prepared)), key=lambda i: len(prompts[i]))
    groups, group, rows = [], [], 0
    for i in order:
        if group and rows + len(prepared[i][1]) > batch_size:
            groups.append(group)
            group, rows = [], 0
        group.append(i)
        rows += len(prepared[i][1])
    groups.append(group)

    for group in groups:
        own = [prompts[i][shared:] for i in group]
        width = max(len(ids) for ids in own)
        own_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        own_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, ids in enumerate(own):  # left padding: every question ends at the same position
            own_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            own_mask[row, width - len(ids) :] = 1
        mask = torch.cat([torch.ones((len(group), shared), dtype=torch.long), own_mask], dim=1)
        # Positions count real tokens only, as in the unpadded sequence (padding gets any position: it is masked).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else None
        if cache is not None:
            cache.batch_repeat_interleave(len(group))
        out = model(
            input_ids=own_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
            **keep_logits,
        )
        first = out.logits[:, -1].float().log_softmax(-1).cpu()  # (items, vocab): each option's first token
        cache = out.past_key_values

        options = [(g, j, ids) for g, i in enumerate(group) for j, ids in enumerate(prepared[i][1])]
        # An option's last token is only predicted, never read: the inputs are its other tokens (none for most).
        length = max(len(ids) for _, _, ids in options) - 1
        rest = torch.zeros((len(options), max(length, 0)))
        if length > 0:
            source = torch.tensor([g for g, _, _ in options])
            logits, targets, _ = forward_after_cached_prefixes(
                model, cache, mask, source, [ids for _, _, ids in options], pad_id
            )
            # Option token k > 0 is predicted at the option's position k - 1.
            rest = logits.float().log_softmax(-1).cpu().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, (g, j, ids) in enumerate(options):  # token 0 is predicted by the question's last position
            total = first[g, ids[0]].item() + rest[row, : len(ids) - 1].double().sum().item()
            scores[group[g]][j] = total / len(ids)
        progress.update(len(options))


def multiple_choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[KnowledgeItem],
    batch_size: int = 32,
    use_chat_template: Optional[bool] = None,
    n_resamples: int = 2000,
    seed: int = 0,
    disable_tqdm: bool = True,
) -> tuple[list[int], Estimate]:
    """Multiple-choice accuracy: an item is correct when its answer scores strictly highest in [`option_scores`].

    A tie with a distractor counts as wrong (a model that cannot tell the options apart does not know the answer).
    With 3 distractors, chance is 25%.

    Args:
        model: a causal LM. tokenizer: its tokenizer.
        items (`Sequence[KnowledgeItem]`): questions with distractors, e.g. `peft_selective.demo.months.knowledge_items()`.
        batch_size (`int`, defaults to 32): sequences per forward pass.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.
        n_resamples (`int`, defaults to 2000), seed (`int`, defaults to 0): of the bootstrap interval.
        disable_tqdm (`bool`, defaults to `True`): hide the progress bar.

    Returns:
        `tuple[list[int], Estimate]`: per item 1 (correct) or 0, in the items' order, and the accuracy.
    """
    items = list(items)
    if not items:
        raise ValueError("No knowledge items; build some with `peft_selective.demo.months.knowledge_items()`.")
    no_options = [item.question for item in items if not item.distractors]
    if no_options:
        raise ValueError(f"Multiple choice needs distractors; these items have none: {no_options[:5]}.")
    scores = option_scores(model, tokenizer, items, batch_size, use_chat_template, disable_tqdm)
    correct = [int(all(score[0] > other for other in score[1:])) for score in scores]
    return correct, bootstrap_rate(correct, n_resamples=n_resamples, seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*)$")
# "X is Y", "X are Y", "it's Y", "Answer: Y": the answer is after the first copula / colon of the first sentence ...
_COPULA = re.compile(r"\s(?:is|are|was|were)\s|\bit['’]s\s|:\s", re.IGNORECASE)
# ... unless that part describes what was asked ("Paris is the capital of France"): then it is before it.
_DESCRIPTION = re.compile(r"^(?:the|a|an)\s+(?:\w+\s+){0,2}(?:of|in|for|used)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])[.!?](?:\s|$)")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [] if value is None or isinstance(value, bool) else [str(value)]


def extract_answer(text: Any) -> str:
    """The answer a generation gives, normalised (casefolded, accents and punctuation removed).

    - JSON (the whole text, see `parse_json`): its string values, in order, e.g. `{"capital": "Paris"}` -> `"paris"`
      (`{"country": "France", "capital": "Paris"}` -> `"france paris"`: [`exact_match`] looks for whole words).
    - A bullet list: the items, e.g. `"- Paris\\n- Lyon"` -> `"paris lyon"`.
    - A sentence: what follows the first "is" / "are" / "was" / "it's" / ":" of the first sentence, e.g. `"The capital
      of France is Paris."` -> `"paris"`; when that describes the question ("Paris is the capital of France.") the
      part before it.
    - Anything else: the first sentence.

    Args:
        text (`str` or messages): the generation.

    Returns:
        `str`
    """
    text = response_text(text).strip()
    parsed, value = parse_json(text)
    if parsed and isinstance(value, (dict, list)):
        return normalize_answer(" ".join(_strings(value)))
    bullets = [m.group(1) for m in map(_BULLET.match, text.splitlines()) if m]
    if bullets:
        return normalize_answer(" ".join(bullets))
    first = _SENTENCE_END.split(text, maxsplit=1)[0]
    split = _COPULA.search(first)
    if split:
        before, after = first[: split.start()], first[split.end() :]
        if after.strip() and not _DESCRIPTION.match(after.strip()):
            return normalize_answer(after)
        if before.strip():
            return normalize_answer(before)
    return normalize_answer(first)


def _contains(haystack: str, needle: str) -> bool:
    needle = normalize_answer(needle)
    return bool(needle) and f" {needle} " in f" {haystack} "


def exact_match(generation: Any, item: KnowledgeItem) -> bool:
    """Whether a generation gives the item's answer (or an alias), as whole words.

    True when the [`extract_answer`] of the generation, or else the whole normalised generation, contains the answer
    and none of the distractors (so listing several options is not a correct answer).

    Args:
        generation (`str` or messages): the model's answer.
        item ([`KnowledgeItem`]): the question.

    Returns:
        `bool`
    """
    text = response_text(generation)
    accepted = (item.answer, *item.aliases)
    for candidate in (extract_answer(text), normalize_answer(text)):
        if any(_contains(candidate, answer) for answer in accepted):
            return not any(_contains(candidate, distractor) for distractor in item.distractors)
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Overlap with training data
# ---------------------------------------------------------------------------------------------------------------------


def _prompt_text(prompt: Any) -> tuple[str, Optional[str]]:
    """A prompt's user text and, for a preference row, its `country` / `entity` field."""
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        entity = prompt.get("entity") or prompt.get("country")
        return _prompt_text(prompt["prompt"])[0], entity
    if isinstance(prompt, Mapping) and "question" in prompt:
        return str(prompt["question"]), prompt.get("entity") or prompt.get("country")
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, Mapping) for m in prompt):
        return " ".join(response_text(m) for m in prompt if m.get("role", "user") != "assistant"), None
    return response_text(prompt), None


def check_no_overlap(items: Iterable[Union[KnowledgeItem, Mapping]], *prompt_collections: Iterable[Any]) -> None:
    """Fail when knowledge items overlap training or anchor prompts.

    An item overlaps a prompt when their normalised texts are equal (the question was trained on), or when the item
    has an `entity` and the prompt is about it: the prompt row's `country` / `entity` field equals it, or, for a
    plain prompt without such a field, the entity occurs in the prompt's text as whole words (conservative: "Guinea"
    is then also found in "Papua New Guinea").

    Args:
        items: [`KnowledgeItem`]s, or dicts with `question` and optionally `entity` / `country` (as
            `peft_selective.evaluation.probes.capital_questions` returns).
        prompt_collections: any number of collections of prompts: strings, TRL message lists, or rows with a
            `prompt` (preference rows; their `country` field is used), e.g. each month's train split and the anchors.

    Raises:
        `ValueError`: naming the overlapping questions and entities and where they were found.
    """
    prompts = []  # (collection index, normalised text, normalised entity or None, original text)
    for index, collection in enumerate(prompt_collections):
        if isinstance(collection, str):
            collection = [collection]
        for prompt in collection:
            text, entity = _prompt_text(prompt)
            prompts.append((index, normalize_answer(text), normalize_answer(entity) if entity else None, text))
    by_text = {}
    for index, normalised, _, text in prompts:
        by_text.setdefault(normalised, (index, text))

    problems = []
    for item in items:
        if isinstance(item, Mapping):
            question, entity = item["question"], item.get("entity") or item.get("country")
        else:
            question, entity = item.question, item.entity
        hit = by_text.get(normalize_answer(question))
        if hit:
            problems.append(f"question {question!r} is prompt {hit[1]!r} of collection {hit[0]}")
            continue
        if not entity:
            continue
        target = normalize_answer(entity)
        for index, normalised, prompt_entity, text in prompts:
            if (prompt_entity == target) if prompt_entity is not None else _contains(normalised, entity):
                problems.append(f"entity {entity!r} of {question!r} is in prompt {text!r} of collection {index}")
                break
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"{len(problems)} knowledge item(s) overlap the training / anchor prompts, so they would measure "
            f"memorised training data: {shown}. Build the items after the data is known, excluding its entities "
            "(e.g. `peft_selective.demo.months.knowledge_items(exclude_countries=countries_in(months))`), or drop these items."
        )
