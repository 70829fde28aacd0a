"""Does a generation side with the chosen or with the rejected answer? A length-robust text similarity.

The similarity of two texts is the mean of their unigram and bigram F1 over [`style_tokens`] (casefolded words,
single punctuation marks and line breaks, counted as multisets, as ROUGE-1/2 F1 do):

    F1_k = 2 * |G_k ∩ R_k| / (|G_k| + |R_k|)        G_k, R_k: k-gram multisets of the generation and the reference

F1 is length-robust where containment or recall is not: a long generation that happens to contain the chosen answer's
few words pays for every extra word in precision, so it is not scored "closer to the chosen" just for being long.
Bigrams add order and punctuation context (`{"`, `- french`, `+ 33`), so a style (JSON, bullets, a leading "+") counts
and not only the shared facts. Since chosen and rejected answers usually carry the same facts, the comparison mostly
measures the style the month teaches.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .text import response_text, style_tokens


__all__ = ["agreement", "similarity"]

_ORDERS = (1, 2)
# Similarities closer than this are a tie (they are ratios of small integers: a real difference is far larger).
_TIE = 1e-9


def _ngrams(tokens: list[str], k: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))


def similarity(text: str, reference: str) -> float:
    """Mean unigram / bigram F1 of two texts' [`style_tokens`], in [0, 1] (1: the same tokens in the same order).

    An order that neither text has (bigrams of one-token texts) is left out of the mean; an order only one text has
    scores 0. Two empty texts have similarity 0.

    Args:
        text (`str`): e.g. a generation.
        reference (`str`): e.g. a chosen answer.

    Returns:
        `float`
    """
    a, b = style_tokens(text), style_tokens(reference)
    scores = []
    for k in _ORDERS:
        grams_a, grams_b = _ngrams(a, k), _ngrams(b, k)
        total = sum(grams_a.values()) + sum(grams_b.values())
        if total == 0:
            continue
        scores.append(2 * sum((grams_a & grams_b).values()) / total)
    return sum(scores) / len(scores) if scores else 0.0


def agreement(generation: Any, chosen: Any, rejected: Any) -> float:
    """Whether a generation is closer to the chosen than to the rejected answer, by [`similarity`].

    Args:
        generation (`str` or messages): the model's answer.
        chosen (`str` or messages): the preferred answer; TRL conversational values (lists of messages) give their
            last assistant message's content.
        rejected (`str` or messages): the dispreferred answer.

    Returns:
        `float`: 1.0 when the generation is closer to `chosen`, 0.0 when closer to `rejected`, 0.5 on a tie (equally
        close, e.g. an empty generation, or chosen and rejected equal), so that a model that cannot tell the two
        apart averages 0.5 rather than being pushed to either side.
    """
    text = response_text(generation)
    to_chosen = similarity(text, response_text(chosen))
    to_rejected = similarity(text, response_text(rejected))
    if abs(to_chosen - to_rejected) <= _TIE:
        return 0.5
    return 1.0 if to_chosen > to_rejected else 0.0
