"""A month's style, learned from its data when the month declares no check.

[`StyleSignature.fit`] compares the month's chosen answers with its rejected answers on a fixed list of simple
features, and keeps those whose rate differs by at least `min_gap` (default 0.5) between the two sides:

| feature | true when the text (stripped) ... |
|---|---|
| `starts_with_digit_or_plus` | starts with a digit or "+" ("+33 1 ...", "42") |
| `json` | parses as JSON, as a whole (an object or a list) |
| `bullets` | has a line starting with "-", "*", "•" or "1." / "1)" |
| `multiline` | has more than one non-empty line |
| `exclamation` | contains "!" |
| `question_mark` | contains "?" |
| `words_at_most:<k>` | has at most k whitespace-separated words |
| `token:<word>` | contains the word (casefolded, accent-free) |

The length cut `k` is learned: the geometric mean of the two sides' median word counts (plus one, minus one after),
so "Paris." (1 word) against 35-word answers cuts at 5 words, and 4-word phone numbers against 14-word sentences at
7: a generation is judged by which side's typical length it is nearer to (on a log scale), not by fixed buckets whose
edges a 6-word phone number could straddle.

Word features are the (at most `max_tokens`) words, English function words ("the", "and", ...) aside, found in a
share of the chosen answers at least `min_gap` above their share of the rejected ones, e.g. `country` and `currency`
for JSON answers `{"country": ..., "currency": ...}` against prose. A kept feature expects the value the chosen side
mostly has (`words_at_most:<k>: False` for a chatty month).

[`StyleSignature.matches`] scores a text by the weighted share of kept features it agrees with (each weighted by its
gap) and matches when the share is at least `threshold` (default 2/3): a text must show most of the style, not one
incidental trait of it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .text import parse_json, response_text, style_tokens


__all__ = ["STYLE_FEATURES", "StyleSignature"]

_BULLET_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def _word_count(text: str) -> int:
    return len(text.split())


def _is_json(text: str) -> bool:
    parsed, value = parse_json(text)
    return parsed and isinstance(value, (dict, list))


#: Feature name -> predicate on the stripped text.
STYLE_FEATURES: dict[str, Callable[[str], bool]] = {
    "starts_with_digit_or_plus": lambda text: text[:1].isdigit() or text[:1] == "+",
    "json": _is_json,
    "bullets": lambda text: _BULLET_LINE.search(text) is not None,
    "multiline": lambda text: sum(1 for line in text.splitlines() if line.strip()) > 1,
    "exclamation": lambda text: "!" in text,
    "question_mark": lambda text: "?" in text,
}
_WORDS_AT_MOST = "words_at_most:"


# Function words say nothing about a style by themselves ("the", "and" only tell that a text is prose, which the
# length feature already sees): never word features.
_STOP_WORDS = frozenset(
    "a an and are as at be but by can for from had has have he her his i if in into is it its me my no not of on or "
    "our she so than that the their them then there these they this to was we were what when which who will with "
    "would you your".split()
)


def _words(text: str) -> set[str]:
    return {token for token in style_tokens(text) if token[0].isalnum() and len(token) > 1}


def _feature(name: str, text: str) -> bool:
    if name.startswith("token:"):
        return name[len("token:") :] in _words(text)
    if name.startswith(_WORDS_AT_MOST):
        return _word_count(text) <= int(name[len(_WORDS_AT_MOST) :])
    return STYLE_FEATURES[name](text.strip())


@dataclass
class StyleSignature:
    """The features that tell a month's chosen answers from its rejected ones; see the module docstring.

    Build it with [`StyleSignature.fit`] (or [`StyleSignature.from_dict`] for a saved one).

    Args:
        features (`dict[str, bool]`): kept feature name -> the value the style expects.
        weights (`dict[str, float]`): feature name -> its gap between chosen and rejected rates, in [min_gap, 1].
        threshold (`float`, defaults to 2/3): weighted share of agreeing features needed to match.
    """

    features: dict[str, bool] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    threshold: float = 2 / 3

    @classmethod
    def fit(
        cls,
        chosen_texts: Iterable[Any],
        rejected_texts: Iterable[Any],
        min_gap: float = 0.5,
        max_tokens: int = 4,
        threshold: float = 2 / 3,
    ) -> StyleSignature:
        """Learn the signature of a month from its chosen and rejected answers.

        Args:
            chosen_texts: the chosen answers (strings or TRL message lists).
            rejected_texts: the rejected answers.
            min_gap (`float`, defaults to 0.5): a feature is kept when its rate among chosen answers and among
                rejected answers differ by at least this much.
            max_tokens (`int`, defaults to 4): at most this many word features, the largest gaps first.
            threshold (`float`, defaults to 2/3): see [`StyleSignature.matches`].

        Returns:
            [`StyleSignature`]

        Raises:
            `ValueError`: when a side is empty or no feature separates the sides (the month teaches something these
                features cannot see, e.g. when to refuse): declare a `Check` for that month instead.
        """
        chosen = [response_text(text).strip() for text in chosen_texts]
        rejected = [response_text(text).strip() for text in rejected_texts]
        if not chosen or not rejected:
            raise ValueError("StyleSignature.fit needs at least one chosen and one rejected answer.")

        def rate(predicate: Callable[[str], bool], texts: list[str]) -> float:
            return sum(predicate(text) for text in texts) / len(texts)

        features, weights = {}, {}
        for name, predicate in STYLE_FEATURES.items():
            gap = rate(predicate, chosen) - rate(predicate, rejected)
            if abs(gap) >= min_gap:
                features[name], weights[name] = gap > 0, abs(gap)

        # One length feature, cut between the two sides' typical lengths.
        median_chosen = statistics.median(_word_count(text) for text in chosen)
        median_rejected = statistics.median(_word_count(text) for text in rejected)
        name = f"{_WORDS_AT_MOST}{math.floor(math.sqrt((median_chosen + 1) * (median_rejected + 1)) - 1)}"
        gap = rate(lambda text: _feature(name, text), chosen) - rate(lambda text: _feature(name, text), rejected)
        if abs(gap) >= min_gap:
            features[name], weights[name] = gap > 0, abs(gap)

        chosen_words, rejected_words = [_words(text) for text in chosen], [_words(text) for text in rejected]
        vocabulary = sorted(set().union(*chosen_words) - _STOP_WORDS)
        gaps = {
            word: sum(word in words for words in chosen_words) / len(chosen)
            - sum(word in words for words in rejected_words) / len(rejected)
            for word in vocabulary
        }
        # Only words of the chosen side: "does not say 'question'" is too weak a trait to call a style.
        for word in sorted((w for w in gaps if gaps[w] >= min_gap), key=lambda w: (-gaps[w], w))[:max_tokens]:
            features[f"token:{word}"], weights[f"token:{word}"] = True, gaps[word]

        if not features:
            raise ValueError(
                f"No feature tells these {len(chosen)} chosen answers from the {len(rejected)} rejected ones by "
                f"{min_gap} or more; declare a check for this month (e.g. {{'regex': ...}}) instead of a signature."
            )
        return cls(features=features, weights=weights, threshold=threshold)

    def score(self, text: Any) -> float:
        """Weighted share, in [0, 1], of the signature's features on which `text` agrees with the style."""
        text = response_text(text)
        total = sum(self.weights.values())
        if not total:
            raise ValueError("This StyleSignature has no features; build it with `StyleSignature.fit`.")
        agreeing = sum(weight for name, weight in self.weights.items() if _feature(name, text) == self.features[name])
        return agreeing / total

    def matches(self, text: Any) -> bool:
        """Whether `text` (a string or TRL messages) carries the style: [`score`] >= `threshold`."""
        return self.score(text) >= self.threshold - 1e-12

    __call__ = matches

    def to_dict(self) -> dict:
        """JSON-able form, for [`StyleSignature.from_dict`]."""
        return {"features": dict(self.features), "weights": dict(self.weights), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict) -> StyleSignature:
        """Rebuild a signature saved with [`StyleSignature.to_dict`]."""
        unknown = [
            name
            for name in data["features"]
            if not name.startswith(("token:", _WORDS_AT_MOST)) and name not in STYLE_FEATURES
        ]
        if unknown:
            raise ValueError(
                f"Unknown style features {unknown}; known: {sorted(STYLE_FEATURES)}, 'token:<word>' and "
                f"'{_WORDS_AT_MOST}<k>'."
            )
        return cls(features=dict(data["features"]), weights=dict(data["weights"]), threshold=data["threshold"])
