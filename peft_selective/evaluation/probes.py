"""Knowledge probes: does the model still know facts it knew before fine-tuning?

The probe asks "What is the capital of X?" for real countries (from the `countryinfo` package) and counts an answer
as correct when the capital's name occurs in the greedy generation. Comparing the accuracy before and after
fine-tuning measures how much world knowledge a PEFT method lets the model forget.

```python
from peft_selective.evaluation.probes import capital_questions, knowledge_probe_accuracy

questions = capital_questions(n=40)
accuracy = knowledge_probe_accuracy(model, tokenizer, questions)
```
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from ..utils.chat import format_prompt


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# Letters that NFKD does not decompose into base letter + accent.
_EXTRA_FOLDS = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"})
# Dropped rather than turned into a space, so that "Sana'a" matches "Sanaa" and "N'Djamena" matches "NDjamena".
_APOSTROPHES = re.compile(r"['’ʻʼ`´]")
_NON_ALNUM = re.compile(r"[\W_]+")


def normalize_answer(text: str) -> str:
    """Normalize text for answer matching: casefold, strip accents, punctuation to single spaces.

    Examples: `"Bogotá"` -> `"bogota"`, `"Port-au-Prince"` -> `"port au prince"`, `"Washington, D.C."` ->
    `"washington d c"`.

    Args:
        text (`str`): the text to normalize.

    Returns:
        `str`: the normalized text, words separated by single spaces.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in text if not unicodedata.combining(char))
    text = text.casefold().translate(_EXTRA_FOLDS)
    text = _APOSTROPHES.sub("", text)
    return " ".join(_NON_ALNUM.sub(" ", text).split())


def answer_matches(answer: str, generation: str) -> bool:
    """Whether the normalized `answer` occurs in the normalized `generation` as whole words.

    Whole words, so that "Malé" does not match "female" nor "Kingston" match "Kingstown".

    Args:
        answer (`str`): the expected answer, e.g. `"Bogotá"`.
        generation (`str`): the model's generated text.

    Returns:
        `bool`
    """
    answer = normalize_answer(answer)
    if not answer:
        return False
    return f" {answer} " in f" {normalize_answer(generation)} "


def _question(country: str) -> str:
    # "The Bahamas" -> "What is the capital of the Bahamas?"
    if country.startswith("The "):
        country = "the " + country[4:]
    return f"What is the capital of {country}?"


def capital_questions(n: Optional[int] = None, seed: int = 0, exclude: Iterable[str] = ()) -> list[dict]:
    """Build "What is the capital of X?" questions from the `countryinfo` package.

    The raw data has some entries that make poor probes, which are left out: territories without a capital, several
    capitals ("Kralendijk / Oranjestad / The Bottom"), entries without an ISO 3166 numeric code (Scotland, Wales,
    outdated duplicates such as "Burma"), ISO codes listed twice with different capitals (Palestine, Vatican), and
    countries whose capital name is part of the country name (Singapore, Monaco, ...), since a model that merely
    repeats the question would be scored correct.

    The order is deterministic: sorted by country, then shuffled with `seed`. Excluded countries are removed after
    the shuffle, so excluding some countries leaves the order of the others unchanged.

    Args:
        n (`int`, *optional*):
            Number of questions to return. Defaults to all of them (about 230).
        seed (`int`, defaults to 0):
            Seed of the shuffle.
        exclude (`Iterable[str]`, defaults to `()`):
            Country names to leave out, e.g. those used for training. Matched case- and accent-insensitively.

    Returns:
        `list[dict]`: items `{"country": str, "question": str, "answer": str}`.
    """
    from countryinfo import CountryInfo

    countries = CountryInfo.all()
    known = {normalize_answer(key) for key in countries} | {normalize_answer(c["name"]) for c in countries.values()}
    excluded = {normalize_answer(name) for name in ([exclude] if isinstance(exclude, str) else exclude)}
    unknown = sorted(excluded - known)
    if unknown:
        # Fail loudly: a misspelled exclusion would silently leak training countries into the probe.
        raise ValueError(f"Unknown countries in `exclude`: {unknown}. Use names as in `countryinfo`, e.g. 'France'.")

    by_iso = defaultdict(list)
    for entry in countries.values():
        name, capital = entry.get("name"), entry.get("capital")
        if isinstance(capital, list):
            capital = capital[0] if len(capital) == 1 else None
        if not name or not isinstance(capital, str) or not capital.strip() or "/" in capital:
            continue
        iso = entry.get("ISO") or {}
        if not iso.get("numeric"):
            continue
        if answer_matches(capital, name):
            continue
        by_iso[iso["numeric"]].append((name, capital.strip()))

    items = []
    for entries in by_iso.values():
        if len({normalize_answer(capital) for _, capital in entries}) > 1:
            continue  # the data contradicts itself (e.g. Palestine: Ramallah / Jerusalem)
        name, capital = min(entries)
        items.append({"country": name, "question": _question(name), "answer": capital})

    items.sort(key=lambda item: item["country"])
    random.Random(seed).shuffle(items)
    items = [item for item in items if normalize_answer(item["country"]) not in excluded]
    if n is not None:
        if n < 0 or n > len(items):
            raise ValueError(f"n must be between 0 and {len(items)} (the number of questions available), got {n}.")
        items = items[:n]
    return items


@dataclass
class ProbeResult:
    """Outcome of a knowledge probe.

    Args:
        accuracy (`float`): fraction of questions answered correctly.
        n (`int`): number of questions asked.
        items (`list[dict]`): the question items, each with `"generation"` (`str`) and `"correct"` (`bool`) added.
    """

    accuracy: float
    n: int
    items: list[dict] = field(repr=False)

    @property
    def n_correct(self) -> int:
        return sum(item["correct"] for item in self.items)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def run_knowledge_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    disable_tqdm: bool = False,
) -> ProbeResult:
    """Ask each question with greedy decoding and check the answers.

    Each question is formatted with the tokenizer's chat template (as a single user turn, with the generation
    prompt) and the batch is left-padded. An answer is correct when the normalized expected answer occurs as whole
    words in the normalized generation (see [`answer_matches`]). Works with plain transformers models and
    `PeftModel`s; runs under `torch.no_grad()` in eval mode and restores the train/eval state of every module, and
    the tokenizer's padding side, afterwards.

    Args:
        model (`PreTrainedModel` or `PeftModel`): a causal LM.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; it must have a chat template.
        questions (`list[dict]`): items with `"question"` and `"answer"`, e.g. from [`capital_questions`].
        max_new_tokens (`int`, defaults to 16): generation length; 16 tokens fit "The capital of X is Y."
        batch_size (`int`, defaults to 16): number of questions generated together.
        disable_tqdm (`bool`, defaults to `False`): hide the progress bar.

    Returns:
        [`ProbeResult`]
    """
    if not questions:
        raise ValueError("`questions` is empty; build some with `capital_questions()`.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template, which this probe uses to ask its questions. Use an instruct/chat "
            "model's tokenizer, or set `tokenizer.chat_template`."
        )

    device = _model_device(model)
    training_modes = {module: module.training for module in model.modules()}
    padding_side, set_pad_token = tokenizer.padding_side, tokenizer.pad_token is None
    # Left padding: with right padding, the shorter prompts would be continued after their pad tokens.
    tokenizer.padding_side = "left"
    if set_pad_token:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    results = []
    try:
        with torch.no_grad(), tqdm(total=len(questions), desc="Knowledge probe", disable=disable_tqdm) as progress:
            for start in range(0, len(questions), batch_size):
                batch = questions[start : start + batch_size]
                prompts = [format_prompt(tokenizer, item["question"], use_chat_template=True)[0] for item in batch]
                # The chat template already contains the special tokens.
                inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                output_ids = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )
                generations = tokenizer.batch_decode(
                    output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for item, generation in zip(batch, generations):
                    generation = generation.strip()
                    results.append(
                        {**item, "generation": generation, "correct": answer_matches(item["answer"], generation)}
                    )
                progress.update(len(batch))
    finally:
        for module, training in training_modes.items():
            module.training = training
        tokenizer.padding_side = padding_side
        if set_pad_token:
            tokenizer.pad_token = None

    n_correct = sum(item["correct"] for item in results)
    return ProbeResult(accuracy=n_correct / len(results), n=len(results), items=results)


def knowledge_probe_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[dict],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    disable_tqdm: bool = False,
) -> float:
    """Fraction of `questions` the model answers correctly; see [`run_knowledge_probe`] for details and arguments.

    Use [`run_knowledge_probe`] to also get the per-question generations.
    """
    return run_knowledge_probe(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, disable_tqdm=disable_tqdm
    ).accuracy
