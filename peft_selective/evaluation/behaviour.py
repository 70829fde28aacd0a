"""Learning and bleed judged by behaviour: what the model generates, with 95% intervals.

A month is *learned* when the model's answers to the month's held-out prompts look like its chosen answers rather
than its rejected ones, and pass the checks the month declares. A month's style *bleeds* when it shows up where it
was not asked for: on prompts outside the month's scope (other months' prompts, generic prompts).

| function | measures |
|---|---|
| [`agreement`] | 1 / 0 / 0.5: a generation is closer to the chosen / rejected answer / neither (length-robust F1) |
| [`Check`] | a declared regex / JSON-schema / function test of a generation |
| [`StyleSignature`] | a month's style learned from its chosen vs rejected answers, when it declares no check |
| [`generate_answers`] | batched greedy answers to prompts (completions only) |
| [`learning_by_behaviour`] | agreement rate and per-check pass rates on a month's prompts, with intervals |
| [`bleed`] | share of off-scope answers carrying a month's style, with its interval |

Compare a tuned model with the base on the same prompts with
[`peft_selective.evaluation.intervals.paired_difference`]: a month is learned when the gain's interval is above 0.

```python
from peft_selective.evaluation.behaviour import bleed, generate_answers, learning_by_behaviour

rows = list(month["test"])
answers = generate_answers(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=64)
result = learning_by_behaviour(answers, rows, checks=[{"json_schema": {"type": "object"}, "name": "json"}])
result["agreement"].to_dict()  # {"mean": 0.9, "ci95": [0.8, 1.0]}
```
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

from .checks import Check
from .generation import generate_answers
from .intervals import Estimate, bootstrap_rate
from .similarity import agreement
from .style import StyleSignature
from .text import response_text


logger = logging.getLogger(__name__)

__all__ = [
    "Check",
    "StyleSignature",
    "agreement",
    "bleed",
    "generate_answers",
    "learning_by_behaviour",
    "style_scores",
]

# A style test: a Check, a check spec (dict), a fitted StyleSignature, or any object with `.matches(text) -> bool`.
StyleTest = Union[Check, Mapping, StyleSignature, Any]


def _as_test(test: StyleTest) -> Any:
    if isinstance(test, Mapping):
        return Check.from_spec(test)
    if not hasattr(test, "matches"):
        raise TypeError(
            f"Expected a Check, a check spec (dict) or a StyleSignature, got {type(test).__name__}: {test!r}."
        )
    return test


def _name(test: Any, index: int, taken: set) -> str:
    name = getattr(test, "name", None) or ("style" if isinstance(test, StyleSignature) else f"check_{index}")
    if name in taken:  # two unnamed signatures, or a repeated name: keep both results
        name = f"{name}_{index}"
    taken.add(name)
    return name


def learning_by_behaviour(
    generations: Sequence[Any],
    rows: Iterable[Mapping],
    checks: Optional[Sequence[StyleTest]] = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How far the generations show the behaviour a month teaches, with 95% intervals.

    Args:
        generations (`Sequence[str]`): the model's answers to the rows' prompts, in the rows' order (e.g. from
            [`generate_answers`]).
        rows (`Iterable[dict]`): the month's held-out preference rows, with `chosen` and `rejected` (strings or TRL
            message lists); a `datasets.Dataset` works too.
        checks (`Sequence`, *optional*): the month's declared checks: [`Check`]s, check specs (dicts) or fitted
            [`StyleSignature`]s. When `None`, a `StyleSignature` is fitted on the rows' chosen vs rejected answers
            (the answers, not the generations) and reported as `"style"`; when no feature separates them (see
            [`StyleSignature.fit`]) only the agreement is reported, with a warning.
        n_resamples (`int`, defaults to 2000), seed (`int`, defaults to 0): of the bootstrap intervals.

    Returns:
        `dict`: `{"agreement": Estimate, "checks": {name: Estimate}, "scores": {"agreement": [...], "checks": {name:
        [...]}}}`. `scores` holds the per-item values, in the rows' order, for
        [`peft_selective.evaluation.intervals.paired_difference`] against another model on the same rows.
    """
    rows = list(rows)
    generations = [response_text(generation) for generation in generations]
    if len(generations) != len(rows):
        raise ValueError(f"Got {len(generations)} generations for {len(rows)} rows; pass one generation per row.")
    if not rows:
        raise ValueError("No rows to evaluate.")
    missing = [key for key in ("chosen", "rejected") if key not in rows[0]]
    if missing:
        raise ValueError(f"Rows need `chosen` and `rejected` (preference rows); missing {missing}.")

    agreements = [agreement(g, row["chosen"], row["rejected"]) for g, row in zip(generations, rows)]
    if checks is None:
        try:
            checks = [StyleSignature.fit([row["chosen"] for row in rows], [row["rejected"] for row in rows])]
        except ValueError as error:
            logger.warning("No style signature for these rows, reporting the agreement only: %s", error)
            checks = []
    tests, taken = {}, set()
    for index, check in enumerate(checks):
        test = _as_test(check)
        tests[_name(test, index, taken)] = test
    check_scores = {name: [float(test.matches(g)) for g in generations] for name, test in tests.items()}
    return {
        "agreement": bootstrap_rate(agreements, n_resamples=n_resamples, seed=seed),
        "checks": {
            name: bootstrap_rate(values, n_resamples=n_resamples, seed=seed) for name, values in check_scores.items()
        },
        "scores": {"agreement": agreements, "checks": check_scores},
    }


def style_scores(generations: Sequence[Any], styles: Union[StyleTest, Sequence[StyleTest]]) -> list[float]:
    """Per generation, 1.0 when it carries any of the styles (passes a check / matches a signature), else 0.0.

    Args:
        generations (`Sequence[str]`): answers (strings or TRL message lists).
        styles: one style test or several ([`Check`], check spec, [`StyleSignature`]).

    Returns:
        `list[float]`
    """
    if isinstance(styles, (Mapping, Check, StyleSignature)) or hasattr(styles, "matches"):
        styles = [styles]
    tests = [_as_test(style) for style in styles]
    if not tests:
        raise ValueError("No style to look for: pass at least one check or signature.")
    return [float(any(test.matches(response_text(g)) for test in tests)) for g in generations]


def bleed(
    generations: Sequence[Any],
    styles: Union[StyleTest, Sequence[StyleTest]],
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Share of off-scope answers that carry a month's style, with its 95% interval.

    Generate answers to prompts the month did not train on (other months' prompts, generic prompts) and pass that
    month's checks or signature. Some styles occur naturally (short answers, a "!"), so compare with the base model's
    rate on the same prompts ([`style_scores`] gives the per-item values for `paired_difference`).

    Args:
        generations (`Sequence[str]`): answers to off-scope prompts.
        styles: the month's [`Check`]s / check specs / [`StyleSignature`] (one or several; any one counts).
        n_resamples (`int`, defaults to 2000), seed (`int`, defaults to 0): of the bootstrap interval.

    Returns:
        [`Estimate`]
    """
    return bootstrap_rate(style_scores(generations, styles), n_resamples=n_resamples, seed=seed)
