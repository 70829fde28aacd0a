"""Forgetting evaluation of a monthly campaign: what was learned and what was kept, month after month.

Two suites, each usable alone (the measurements themselves live in `trl_ext.metrics` and `peft_selective.probes`):

- [`preference_suite`]: length-fair preference accuracy on each month's held-out pairs. Margins are measured against
  fixed reference log-probs (the base model's, computed once per test split with [`reference_logps_for`]), so the
  retention matrix R[t][i] = accuracy on month i's pairs after month t is comparable across t.
- [`general_suite`]: general ability, compared with month 0 (the base model): knowledge QA accuracy (greedy
  generation on held-out capital questions), reference-text perplexity, KL to the base on generic prompts, refusal
  rate on harmful requests and over-refusal on benign look-alikes, and the drift probe (probability mass on JSON
  punctuation, list bullets and digits while decoding generic prompts).

[`evaluate_model`] runs the suites an [`EvaluationConfig`] names and returns a JSON-able dict;
[`retention_matrix`] and [`general_table`] turn a campaign's history of such dicts into the tables of the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft_selective.probes import run_knowledge_probe

from .data import benign_eval_prompts, harmful_eval_prompts
from .metrics import (
    drift_probes,
    generic_prompts,
    kl_to_reference,
    perplexity,
    preference_accuracy,
    preference_logps,
    refusal_rate,
    retention_summary,
)


logger = logging.getLogger(__name__)

SUITES = ("preference", "knowledge", "perplexity", "kl", "refusal", "drift")
#: General-ability metrics in report order, with the direction that is better.
GENERAL_METRICS = {
    "knowledge_qa": "higher",
    "perplexity": "lower",
    "kl_to_base": "lower",
    "refusal_rate": "higher",
    "over_refusal_rate": "lower",
    "drift_json": "lower",
    "drift_bullets": "lower",
    "drift_digits": "lower",
}


@dataclass
class EvaluationConfig:
    """What [`evaluate_model`] measures, and how much of it (generation is the slow part on a CPU).

    Attributes:
        suites (`list[str]`): any of `"preference"`, `"knowledge"`, `"perplexity"`, `"kl"`, `"refusal"`, `"drift"`.
        knowledge_questions (`int`): held-out capital questions for the knowledge probe (fixed per campaign).
        knowledge_seed (`int`): seed of the question draw.
        knowledge_max_new_tokens (`int`): answer length for the knowledge probe.
        perplexity_max_tokens (`int`): tokens of the reference text (`pydoc_data`) scored.
        refusal_prompts (`int`): harmful (and as many benign) prompts for the refusal rates.
        refusal_max_new_tokens (`int`): answer length for the refusal rates.
        drift_prompts (`int`): generic prompts for the drift probe (and the KL to the base).
        drift_max_new_tokens (`int`): decoding length of the drift probe.
        max_length (`int`): truncation of preference pairs and KL prompts.
        batch_size (`int`): rows per forward / generate call.
    """

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    knowledge_questions: int = 40
    knowledge_seed: int = 0
    knowledge_max_new_tokens: int = 16
    perplexity_max_tokens: int = 4096
    refusal_prompts: int = 20
    refusal_max_new_tokens: int = 32
    drift_prompts: int = 12
    drift_max_new_tokens: int = 24
    max_length: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = [suite for suite in self.suites if suite not in SUITES]
        if unknown:
            raise ValueError(f"Unknown evaluation suites {unknown}; choose from {list(SUITES)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- preference
def reference_logps_for(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, config: EvaluationConfig
) -> dict[str, list[float]]:
    """The reference log-probs of one test split (JSON-able), to compute once with the base model and store."""
    logps = preference_logps(model, tokenizer, dataset, batch_size=config.batch_size, max_length=config.max_length)
    return {key: value.tolist() for key, value in logps.items() if isinstance(value, torch.Tensor)}


def preference_suite(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test_sets: Mapping[str, Dataset],
    reference_logps: Mapping[str, Mapping[str, Sequence[float]]],
    config: Optional[EvaluationConfig] = None,
) -> dict[str, dict[str, float]]:
    """Length-fair preference accuracy of `model` on every month's held-out pairs: `{month: {"accuracy",
    "mean_margin", "n"}}`, margins taken against `reference_logps[month]` (see [`reference_logps_for`])."""
    config = config or EvaluationConfig()
    results = {}
    for month, dataset in test_sets.items():
        if month not in reference_logps:
            raise KeyError(f"No reference log-probs for month {month!r}; compute them with `reference_logps_for`.")
        reference = {key: torch.tensor(value) for key, value in reference_logps[month].items()}
        result = preference_accuracy(
            model, tokenizer, dataset, reference=reference, batch_size=config.batch_size, max_length=config.max_length
        )
        logger.info("Preference accuracy on %s: %.3f (%d pairs).", month, result["accuracy"], result["n"])
        results[month] = {"accuracy": result["accuracy"], "mean_margin": result["mean_margin"], "n": result["n"]}
    return results


# ------------------------------------------------------------------------------------------------- general
def _base_reference(model: nn.Module) -> Optional[Callable[[], Any]]:
    # For a PeftModel, the base is the same network with every adapter disabled.
    return model.disable_adapter if isinstance(model, PeftModel) else None


def general_suite(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Optional[EvaluationConfig] = None,
    knowledge_questions: Optional[list[dict]] = None,
    base: Optional[Any] = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """General-ability metrics of `model` (see the module docstring), the suites of `config` only.

    Args:
        knowledge_questions: `{"question", "answer"}` items (e.g. `trl_ext.data.held_out_capital_questions`); required
            for the `"knowledge"` suite.
        base: the month-0 model for the KL (a model, or a callable returning a context manager in which `model` acts
            as the base). Default: the adapters disabled, for a `PeftModel`; the KL is 0 for a plain model.
    """
    config = config or EvaluationConfig()
    suites = set(config.suites)
    results: dict[str, float] = {}
    if "knowledge" in suites:
        if not knowledge_questions:
            raise ValueError("The knowledge suite needs `knowledge_questions` (held-out capital questions).")
        probe = run_knowledge_probe(
            model,
            tokenizer,
            knowledge_questions,
            max_new_tokens=config.knowledge_max_new_tokens,
            batch_size=config.batch_size,
            disable_tqdm=not show_progress,
        )
        results["knowledge_qa"] = probe.accuracy
        logger.info("Knowledge QA: %.3f on %d held-out capital questions.", probe.accuracy, len(knowledge_questions))
    if "perplexity" in suites:
        results["perplexity"] = perplexity(
            model, tokenizer, max_tokens=config.perplexity_max_tokens, batch_size=max(1, config.batch_size // 2)
        )
        logger.info("Reference-text perplexity: %.3f.", results["perplexity"])
    prompts = generic_prompts()[: config.drift_prompts]
    if "kl" in suites:
        reference = base if base is not None else _base_reference(model)
        results["kl_to_base"] = (
            0.0
            if reference is None
            else kl_to_reference(
                model, reference, tokenizer, prompts, batch_size=config.batch_size, max_length=config.max_length
            )
        )
    if "kl" in suites:
        logger.info("KL to the base on %d generic prompts: %.5f.", len(prompts), results["kl_to_base"])
    if "refusal" in suites:
        n = config.refusal_prompts
        common = dict(max_new_tokens=config.refusal_max_new_tokens, batch_size=config.batch_size)
        results["refusal_rate"] = refusal_rate(model, tokenizer, harmful_eval_prompts()[:n], **common)
        results["over_refusal_rate"] = refusal_rate(model, tokenizer, benign_eval_prompts()[:n], **common)
        logger.info(
            "Refusals: %.2f of harmful, %.2f of benign prompts.", results["refusal_rate"], results["over_refusal_rate"]
        )
    if "drift" in suites:
        drift = drift_probes(
            model,
            tokenizer,
            {"json": "json", "bullets": "bullets", "digits": "digits"},
            prompts,
            max_new_tokens=config.drift_max_new_tokens,
            batch_size=config.batch_size,
        )
        results.update({f"drift_{name}": value["mass"] for name, value in drift.items()})
        logger.info("Drift probe: %s.", ", ".join(f"{n} {v['mass']:.4f}" for n, v in drift.items()))
    return results


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Optional[EvaluationConfig] = None,
    test_sets: Optional[Mapping[str, Dataset]] = None,
    reference_logps: Optional[Mapping[str, Mapping[str, Sequence[float]]]] = None,
    knowledge_questions: Optional[list[dict]] = None,
    base: Optional[Any] = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Both suites: `{"preference": {month: {...}}, "general": {metric: value}}` (JSON-able)."""
    config = config or EvaluationConfig()
    was_training = model.training
    model.eval()
    try:
        preference = {}
        if "preference" in config.suites and test_sets:
            preference = preference_suite(model, tokenizer, test_sets, reference_logps or {}, config)
        general = general_suite(model, tokenizer, config, knowledge_questions, base, show_progress)
    finally:
        model.train(was_training)
    return {"preference": preference, "general": general}


# ------------------------------------------------------------------------------------------------- tables
def retention_matrix(history: Mapping[str, Mapping[str, Any]], months: Sequence[str]) -> list[list[Optional[float]]]:
    """R[t][i]: accuracy on month i's held-out pairs after month t, from `history[month]["preference"]`; `None` for
    i > t or a measurement that is missing."""
    matrix = []
    for t, after in enumerate(months):
        scores = history.get(after, {}).get("preference", {})
        matrix.append([scores.get(month, {}).get("accuracy") if i <= t else None for i, month in enumerate(months)])
    return matrix


def retention_numbers(history: Mapping[str, Mapping[str, Any]], months: Sequence[str]) -> dict[str, Any]:
    """Average accuracy and backward transfer of [`retention_matrix`] (NaN where undefined)."""
    if not months:
        return {"average_accuracy": math.nan, "bwt": math.nan}
    matrix = [[math.nan if v is None else v for v in row] for row in retention_matrix(history, months)]
    summary = retention_summary(matrix)
    return {"average_accuracy": summary["average_accuracy"], "bwt": summary["bwt"]}


def general_table(history: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """`{metric: {column: value}}` for the general metrics measured in `history[column]["general"]`, in report order
    (`columns` usually `["month-0", month 1, ...]`)."""
    table: dict[str, dict[str, float]] = {}
    names = list(GENERAL_METRICS) + sorted(
        {m for c in columns for m in history.get(c, {}).get("general", {})} - set(GENERAL_METRICS)
    )
    for metric in names:
        row = {c: history[c]["general"][metric] for c in columns if metric in history.get(c, {}).get("general", {})}
        if row:
            table[metric] = row
    return table
