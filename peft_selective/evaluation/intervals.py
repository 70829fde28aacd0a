"""95% intervals for behavioural rates: a percentile bootstrap of a mean, and of a paired difference.

Every behavioural number of this package is the mean of per-item scores (1 when an answer shows the behaviour, 0 when
it does not, or a value in between such as a tie's 0.5), so one resampling scheme serves them all:

```python
from peft_selective.evaluation.intervals import bootstrap_rate, is_gain, paired_difference

rate = bootstrap_rate(scores)  # Estimate(mean=0.62, lo=0.50, hi=0.73, n=60)
gain = paired_difference(scores_after, scores_before)  # same items, two models
is_gain(gain)  # True only when the whole interval is above 0
```

Resampling uses a seeded `torch.Generator`, so a result is reproducible bit for bit on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch


__all__ = ["Estimate", "bootstrap_mean", "bootstrap_rate", "is_gain", "is_loss", "paired_difference", "paired_ratio"]


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval.

    Args:
        mean (`float`): the mean of the per-item scores.
        lo (`float`): lower end of the 95% interval.
        hi (`float`): upper end of the 95% interval.
        n (`int`): number of items.
    """

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        """`{"mean": mean, "ci95": [lo, hi]}`, JSON-able (the shape reports and cards use)."""
        return {"mean": self.mean, "ci95": [self.lo, self.hi]}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n})"


def _as_tensor(values: Sequence[float], name: str) -> torch.Tensor:
    if isinstance(values, str):
        raise TypeError(f"`{name}` must be a sequence of numbers, not a string.")
    tensor = torch.as_tensor([float(value) for value in values], dtype=torch.float64)
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` is empty: an interval needs at least one item.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return tensor


def bootstrap_mean(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Estimate:
    """Percentile-bootstrap interval of the mean of `values` (any real numbers).

    The items are resampled with replacement `n_resamples` times; the interval runs between the (1 - confidence) / 2
    and (1 + confidence) / 2 quantiles of the resampled means. [`bootstrap_rate`] and [`paired_difference`] are this
    function with their own input checks.

    Args:
        values (`Sequence[float]`): per-item scores.
        n_resamples (`int`, defaults to 2000): bootstrap resamples; 2000 puts the quantiles' own noise well below the
            interval's width.
        seed (`int`, defaults to 0): seed of the resampling.
        confidence (`float`, defaults to 0.95): coverage the interval aims at.

    Returns:
        [`Estimate`]
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    x = _as_tensor(values, "values")
    n = x.numel()
    generator = torch.Generator().manual_seed(seed)
    # One (n_resamples, n) index draw; cut into chunks so that 2000 x 10^5 items stays a few hundred MB at most.
    chunk = max(1, 2**24 // n)
    means = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        index = torch.randint(n, (size, n), generator=generator)
        means.append(x[index].mean(dim=1))
    means = torch.cat(means)
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    mean = x.mean().item()
    # Quantile interpolation can put an end a rounding error past the mean of a constant sample.
    return Estimate(mean=mean, lo=min(lo, mean), hi=max(hi, mean), n=n)


def bootstrap_rate(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Rate of a behaviour with its 95% percentile-bootstrap interval.

    Args:
        values (`Sequence[float]`): per-item scores in [0, 1]: 0/1 outcomes, or fractions such as a tie's 0.5.
        n_resamples (`int`, defaults to 2000): bootstrap resamples.
        seed (`int`, defaults to 0): seed of the resampling.

    Returns:
        [`Estimate`]: the mean and its interval. When every item has the same score the interval is that single
        point: the bootstrap cannot see variation the sample does not have (with 0 of 60 items, the true rate may
        still be up to ~5%), so read an all-0 or all-1 interval as "below / above what n items can resolve".
    """
    x = _as_tensor(values, "values")
    if ((x < 0) | (x > 1)).any():
        raise ValueError("Rates need per-item scores in [0, 1]; use `bootstrap_mean` for other values.")
    return bootstrap_mean(x.tolist(), n_resamples=n_resamples, seed=seed)


def paired_difference(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `a - b` over the same items, with its 95% paired-bootstrap interval.

    Pairing (resampling items, not the two models' scores separately) removes the variation between items that both
    models share, so the interval is much narrower than two independent intervals would suggest.

    Args:
        a (`Sequence[float]`): per-item scores of one model (e.g. after a month).
        b (`Sequence[float]`): the other model's scores on the same items in the same order (e.g. the base).
        n_resamples (`int`, defaults to 2000): bootstrap resamples.
        seed (`int`, defaults to 0): seed of the resampling.

    Returns:
        [`Estimate`]: of mean(a - b); see [`is_gain`] / [`is_loss`].
    """
    x, y = _as_tensor(a, "a"), _as_tensor(b, "b")
    if x.numel() != y.numel():
        raise ValueError(f"Paired scores need the same items: got {x.numel()} and {y.numel()} scores.")
    return bootstrap_mean((x - y).tolist(), n_resamples=n_resamples, seed=seed)


def paired_ratio(
    numerator: Sequence[float], denominator: Sequence[float], n_resamples: int = 2000, seed: int = 0
) -> Optional[Estimate]:
    """Ratio of means `mean(numerator) / mean(denominator)` over the same items, with its 95% paired-bootstrap
    interval: "ours as a share of theirs", e.g. our knowledge loss (base − ours, per item) over LoRA's (base − LoRA).

    Items are resampled jointly, so what both models share cancels as in [`paired_difference`]. Resamples whose
    denominator mean is not positive are left out of the interval (the share is undefined there); when the
    denominator's own mean is not positive, there is nothing to take a share of and `None` is returned.

    Args:
        numerator (`Sequence[float]`): per-item values of ours.
        denominator (`Sequence[float]`): per-item values of the reference, on the same items in the same order.
        n_resamples (`int`, defaults to 2000): bootstrap resamples.
        seed (`int`, defaults to 0): seed of the resampling.

    Returns:
        [`Estimate`] of the ratio, or `None` when `mean(denominator) <= 0`.
    """
    x, y = _as_tensor(numerator, "numerator"), _as_tensor(denominator, "denominator")
    if x.numel() != y.numel():
        raise ValueError(f"Paired values need the same items: got {x.numel()} and {y.numel()} values.")
    if y.mean().item() <= 0:
        return None
    n = x.numel()
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**24 // n)
    ratios = []
    for start in range(0, n_resamples, chunk):
        index = torch.randint(n, (min(chunk, n_resamples - start), n), generator=generator)
        num, den = x[index].mean(dim=1), y[index].mean(dim=1)
        ratios.append((num / den)[den > 0])
    ratios = torch.cat(ratios)
    ratio = x.mean().item() / y.mean().item()
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Estimate(mean=ratio, lo=min(lo, ratio), hi=max(hi, ratio), n=n)


def is_gain(estimate: Estimate) -> bool:
    """Whether a difference is a gain: its whole interval is above 0 (`lo > 0`); an interval that includes 0 is not."""
    return not math.isnan(estimate.lo) and estimate.lo > 0


def is_loss(estimate: Estimate) -> bool:
    """Whether a difference is a loss (e.g. forgetting): its whole interval is below 0 (`hi < 0`)."""
    return not math.isnan(estimate.hi) and estimate.hi < 0
