"""Forgetting evaluation of a monthly campaign: what was learned and what was kept, month after month, judged the way
users feel it (by what the model generates) and reported with 95% bootstrap intervals.

Suites (each usable alone; the measurements live in `peft_selective.evaluation`, `peft_selective.evaluation.preference` and
`peft_selective.evaluation.probes`):

- `"behaviour"` (generation-based): greedy answers to every month's held-out prompts ([`generate_answers`], batched),
  scored per item by the month's declared checks (1 when every check passes) or, for a month without checks, by the
  agreement score (1 / 0 / 0.5: the answer is closer to the chosen / the rejected answer / neither). The behavioural
  retention matrix R[t][i] is the mean of these scores on month i's prompts after month t ([`retention_matrix`]).
  The same generations, with those of the generic prompts and of the knowledge questions, measure **bleed**: the share
  of off-scope answers (generic prompts, the other months' prompts, knowledge questions) that carry a month's style
  (its `bleed_checks`, else its checks, else a [`StyleSignature`] fitted on its chosen vs rejected answers).
- `"preference"` (ranking, not generation): on each month's held-out pairs, the length-normalised preference accuracy
  of the policy on its own terms (mean per-token log-prob of the chosen answer above the rejected one) and its mean
  margin, plus the DPO implicit-reward accuracy against the base model's stored log-probs
  (`implicit_reward_accuracy`, which saturates at 1.0 long before answers change: it is never called learning).
  Both come from one forward pass of the policy.
- `"knowledge"`: multiple-choice log-likelihood accuracy on every item of a knowledge pool (format-independent) and
  greedy exact match (after answer extraction) on a subset of it.
- `"perplexity"`, `"kl"`, `"refusal"`, `"drift"` (general ability, compared with month 0): reference-text
  perplexity, KL to the base on generic prompts, refusal rate on harmful requests and over-refusal on benign
  look-alikes, and the drift probe (probability mass on JSON punctuation, list bullets and digits).

[`evaluate_model`] runs the suites an [`EvaluationConfig`] names and returns a JSON-able dict with the per-item scores
(so intervals and paired differences can be recomputed) and `{"mean", "ci95"}` summaries. [`retention_matrix`],
[`retention_numbers`], [`learning_table`], [`bleed_table`], [`knowledge_table`], [`ranking_table`] and
[`general_table`] re-aggregate a campaign's history of such dicts into the tables of the report and the cards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import (
    Check,
    Estimate,
    KnowledgeItem,
    StyleSignature,
    bootstrap_rate,
    exact_match,
    generate_answers,
    is_gain,
    learning_by_behaviour,
    multiple_choice_accuracy,
    paired_difference,
    style_scores,
)
from .preference import (
    drift_probes,
    generic_prompts,
    kl_to_reference,
    perplexity,
    preference_accuracy,
    preference_logps,
    refusal_rate,
)
from .refusal import benign_eval_prompts, harmful_eval_prompts


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.getLogger(__name__)

SUITES = ("preference", "behaviour", "knowledge", "perplexity", "kl", "refusal", "drift")
#: General-ability metrics in report order, with the direction that is better (knowledge has its own table).
GENERAL_METRICS = {
    "perplexity": "lower",
    "kl_to_base": "lower",
    "refusal_rate": "higher",
    "over_refusal_rate": "lower",
    "drift_json": "lower",
    "drift_bullets": "lower",
    "drift_digits": "lower",
}
#: Fewer surviving knowledge items than this: the report warns (the interval of the accuracy gets wide).
MIN_KNOWLEDGE_ITEMS = 150


@dataclass
class EvaluationConfig:
    """What [`evaluate_model`] measures, and how much of it (generation is the slow part on a CPU: the defaults keep
    an evaluation of the bundled 135M model to a few minutes).

    Attributes:
        suites (`list[str]`): any of `"preference"`, `"behaviour"`, `"knowledge"`, `"perplexity"`, `"kl"`,
            `"refusal"`, `"drift"`.
        behaviour_max_new_tokens (`int`, defaults to 24): greedy answer length on the months' held-out prompts and on
            the generic prompts (learning, retention and bleed share these generations).
        behaviour_examples (`int`, defaults to 3): generations kept per month in the result (examples only: the
            scores are what is stored).
        knowledge_exact_items (`int`, defaults to 40): knowledge items answered by greedy generation for the exact
            match (the first ones given: the campaign passes the first surviving items of its pool); their answers
            also count as off-scope generations for the bleed.
        knowledge_max_new_tokens (`int`, defaults to 16): answer length of those knowledge questions.
        knowledge_min_items (`int`, defaults to 150): fewer surviving multiple-choice items than this and the report
            warns.
        perplexity_max_tokens (`int`, defaults to 4096): tokens of the reference text (`pydoc_data`) scored.
        refusal_prompts (`int`, defaults to 20): harmful (and as many benign) prompts for the refusal rates.
        refusal_max_new_tokens (`int`, defaults to 32): answer length for the refusal rates.
        drift_prompts (`int`, defaults to 12): generic prompts for the drift probe, the KL to the base and the bleed.
        drift_max_new_tokens (`int`, defaults to 24): decoding length of the drift probe.
        max_length (`int`, defaults to 256): truncation of preference pairs and KL prompts.
        batch_size (`int`, defaults to 8): rows per forward call (preference pairs, perplexity windows: half of it,
            KL prompts; the multiple-choice options: 4 times it).
        generation_batch_size (`int`, *optional*): prompts per generate call; default 4 x `batch_size`. Greedy
            decoding pays a forward of the whole model per new token whatever the batch, so small batches are slow:
            the bundled model on one CPU thread answered the 40 refusal prompts in 26 s in batches of 8, in 20 s in
            batches of 32 (with other processes on the cores: 46 s in batches of 8, 28 s in one batch). A batch's
            memory is its KV cache.
        bootstrap_resamples (`int`, defaults to 2000): resamples of every 95% interval.
        seed (`int`, defaults to 0): seed of the bootstrap resampling.
    """

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    behaviour_max_new_tokens: int = 24
    behaviour_examples: int = 3
    knowledge_exact_items: int = 40
    knowledge_max_new_tokens: int = 16
    knowledge_min_items: int = MIN_KNOWLEDGE_ITEMS
    perplexity_max_tokens: int = 4096
    refusal_prompts: int = 20
    refusal_max_new_tokens: int = 32
    drift_prompts: int = 12
    drift_max_new_tokens: int = 24
    max_length: int = 256
    batch_size: int = 8
    generation_batch_size: Optional[int] = None
    bootstrap_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [suite for suite in self.suites if suite not in SUITES]
        if unknown:
            raise ValueError(f"Unknown evaluation suites {unknown}; choose from {list(SUITES)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def generate_batch_size(self) -> int:
        """Prompts per generate call: `generation_batch_size`, else 4 x `batch_size`."""
        return self.generation_batch_size or max(1, 4 * self.batch_size)


@contextlib.contextmanager
def _timed(timings: Optional[dict[str, float]], name: str):
    """Add the wall seconds of the block to `timings[name]` (nothing when `timings` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _estimate(values: Sequence[float], config: EvaluationConfig) -> Optional[dict]:
    """`{"mean", "ci95"}` of per-item scores in [0, 1]; None without items."""
    if not values:
        return None
    return bootstrap_rate(values, n_resamples=config.bootstrap_resamples, seed=config.seed).to_dict()


def _summary(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Optional[dict]:
    if not values:
        return None
    estimate = bootstrap_rate(values, n_resamples=n_resamples, seed=seed)
    return {**estimate.to_dict(), "n": estimate.n}


def _difference(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Optional[dict]:
    if not a:
        return None
    estimate = paired_difference(a, b, n_resamples=n_resamples, seed=seed)
    return {**estimate.to_dict(), "n": estimate.n}


# ------------------------------------------------------------------------------------------------- month specs
def month_tests(spec: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """A month's behavioural tests from its JSON-able spec (as the campaign stores it in the month's entry):
    `{"checks": [check specs], "bleed_checks": [check specs], "style_signature": {...} or None, "style_note": str}`.

    Returns:
        `dict`: `checks` (`list[Check]`, scored on the month's own prompts), `bleed` (the tests of its style on
        off-scope answers: `bleed_checks`, else `checks`, else the fitted signature; may be empty), `bleed_source`
        (`"bleed_checks"`, `"checks"`, `"style_signature"` or `None`) and `note` (why there is no bleed test).
    """
    spec = spec or {}
    checks = [Check.from_spec(c) for c in spec.get("checks") or []]
    bleed_checks = [Check.from_spec(c) for c in spec.get("bleed_checks") or []]
    if bleed_checks:
        return {"checks": checks, "bleed": bleed_checks, "bleed_source": "bleed_checks", "note": None}
    if checks:
        return {"checks": checks, "bleed": checks, "bleed_source": "checks", "note": None}
    signature = spec.get("style_signature")
    if signature:
        return {
            "checks": [],
            "bleed": [StyleSignature.from_dict(signature)],
            "bleed_source": "style_signature",
            "note": None,
        }
    note = spec.get("style_note") or "no check declared and no style signature"
    return {"checks": [], "bleed": [], "bleed_source": None, "note": note}


def fit_style_signature(chosen: Sequence[Any], rejected: Sequence[Any]) -> tuple[Optional[dict], Optional[str]]:
    """A month's [`StyleSignature`] fitted on its chosen vs rejected answers, JSON-able, or `(None, why)` when no
    feature separates them (bleed for that month then uses none, and the report says so)."""
    try:
        return StyleSignature.fit(list(chosen), list(rejected)).to_dict(), None
    except ValueError as error:
        return None, f"no style signature: {error}"


def _as_item(item: Union[KnowledgeItem, Mapping]) -> KnowledgeItem:
    if isinstance(item, KnowledgeItem):
        return item
    return KnowledgeItem(
        question=item["question"],
        answer=item["answer"],
        distractors=tuple(item.get("distractors") or ()),
        aliases=tuple(item.get("aliases") or ()),
        entity=item.get("entity") or item.get("country"),
    )


# ------------------------------------------------------------------------------------------------- preference
def reference_logps_for(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    config: EvaluationConfig,
    show_progress: bool = False,
) -> dict[str, list[float]]:
    """The reference log-probs of one test split (JSON-able), to compute once with the base model and store."""
    logps = preference_logps(
        model,
        tokenizer,
        dataset,
        batch_size=config.batch_size,
        max_length=config.max_length,
        show_progress=show_progress,
        desc="Reference log-probs (test pairs)",
    )
    return {key: value.tolist() for key, value in logps.items() if isinstance(value, torch.Tensor)}


def preference_suite(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    test_sets: Mapping[str, Dataset],
    reference_logps: Optional[Mapping[str, Mapping[str, Sequence[float]]]] = None,
    config: Optional[EvaluationConfig] = None,
    show_progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Ranking of every month's held-out pairs, from one forward pass of `model` per month (`show_progress`: a bar
    per month).

    Per month: `ranking_accuracy` (`{"mean", "ci95"}`: share of pairs whose chosen answer has the higher mean
    per-token log-prob, [`peft_selective.evaluation.preference.preference_accuracy`] with `reference=None`), `ranking_margin` (mean of that
    margin, nats per token), and, when `reference_logps[month]` (the base model's, see [`reference_logps_for`]) is
    given, `implicit_reward_accuracy` / `implicit_reward_margin` (the DPO implicit reward against the base: it measures
    that training moved the log-probs, not what the model answers); `n`; `items` (per pair 0/1 of both accuracies).
    """
    config = config or EvaluationConfig()
    reference_logps = reference_logps or {}
    results = {}
    for month, dataset in test_sets.items():
        result = preference_accuracy(
            model,
            tokenizer,
            dataset,
            reference=None,
            batch_size=config.batch_size,
            max_length=config.max_length,
            show_progress=show_progress,
            desc=f"Preference {month}",
        )
        ranking = [int(m > 0) for m in result["margins"].tolist()]  # NaN (truncated away) counts as wrong
        entry: dict[str, Any] = {
            "ranking_accuracy": _estimate(ranking, config),
            "ranking_margin": result["mean_margin"],
            "n": result["n"],
            "items": {"ranking": ranking},
        }
        if month in reference_logps:
            policy = result["logps"]
            reference = {
                key: torch.as_tensor(value, dtype=torch.float64) for key, value in reference_logps[month].items()
            }
            if reference["chosen_logps"].shape != policy["chosen_logps"].shape:
                raise ValueError(f"The reference log-probs of month {month!r} do not match its {result['n']} pairs.")
            margins = (policy["chosen_logps"] - reference["chosen_logps"]) - (
                policy["rejected_logps"] - reference["rejected_logps"]
            )
            implicit = [int(m > 0) for m in margins.tolist()]
            entry["implicit_reward_accuracy"] = sum(implicit) / len(implicit)
            entry["implicit_reward_margin"] = margins.nanmean().item()
            entry["items"]["implicit_reward"] = implicit
        logger.info(
            "Ranking accuracy on %s: %.3f (%d pairs); implicit-reward accuracy %s.",
            month,
            entry["ranking_accuracy"]["mean"],
            entry["n"],
            f"{entry['implicit_reward_accuracy']:.3f}" if "implicit_reward_accuracy" in entry else "n/a",
        )
        results[month] = entry
    return results


# ------------------------------------------------------------------------------------------------- behaviour
def behaviour_scores(
    generations: Sequence[str], rows: Sequence[Mapping], checks: Sequence[Check], config: EvaluationConfig
) -> dict[str, Any]:
    """Per-item behavioural scores of one month's held-out prompts (the convention of `benchmarks/forgetting.py`):
    `scores` = 1/0 whether every declared check passes, or the agreement score for a month without checks; with
    `agreement` and `checks` ({name: per-item}) and their `summary` intervals."""
    result = learning_by_behaviour(
        generations, rows, checks=list(checks), n_resamples=config.bootstrap_resamples, seed=config.seed
    )
    agreement_scores = result["scores"]["agreement"]
    check_scores = result["scores"]["checks"]
    if checks:
        scores = [float(all(values[k] for values in check_scores.values())) for k in range(len(rows))]
    else:
        scores = list(agreement_scores)
    return {
        "scored_by": "checks" if checks else "agreement",
        "scores": scores,
        "agreement": agreement_scores,
        "checks": check_scores,
        "summary": {
            "score": _estimate(scores, config),
            "agreement": result["agreement"].to_dict(),
            "checks": {name: estimate.to_dict() for name, estimate in result["checks"].items()},
        },
        "n": len(rows),
    }


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))


# ------------------------------------------------------------------------------------------------- general
def _base_reference(model: nn.Module) -> Optional[Callable[[], Any]]:
    # For a PeftModel, the base is the same network with every adapter disabled.
    return model.disable_adapter if isinstance(model, PeftModel) else None


def general_suite(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: Optional[EvaluationConfig] = None,
    base: Optional[Any] = None,
    show_progress: bool = False,
    timings: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    """General-ability metrics of `model` that are not generation-scored against a month (see the module
    docstring): perplexity, KL to the base, refusal rates and the drift probe, the suites of `config` only.

    Args:
        base: the month-0 model for the KL (a model, or a callable returning a context manager in which `model` acts
            as the base). Default: the adapters disabled, for a `PeftModel`; the KL is 0 for a plain model.
        show_progress: a progress bar per suite.
        timings: filled with the wall seconds of each suite (`{suite: seconds}`, added to what it holds).
    """
    config = config or EvaluationConfig()
    suites = set(config.suites)
    results: dict[str, float] = {}
    if "perplexity" in suites:
        with _timed(timings, "perplexity"):
            results["perplexity"] = perplexity(
                model,
                tokenizer,
                max_tokens=config.perplexity_max_tokens,
                batch_size=max(1, config.batch_size // 2),
                show_progress=show_progress,
            )
        logger.info("Reference-text perplexity: %.3f.", results["perplexity"])
    prompts = generic_prompts()[: config.drift_prompts]
    if "kl" in suites:
        reference = base if base is not None else _base_reference(model)
        with _timed(timings, "kl"):
            results["kl_to_base"] = (
                0.0
                if reference is None
                else kl_to_reference(
                    model,
                    reference,
                    tokenizer,
                    prompts,
                    batch_size=config.batch_size,
                    max_length=config.max_length,
                    show_progress=show_progress,
                    desc="KL to the base",
                )
            )
        logger.info("KL to the base on %d generic prompts: %.5f.", len(prompts), results["kl_to_base"])
    if "refusal" in suites:
        n = config.refusal_prompts
        common = dict(
            max_new_tokens=config.refusal_max_new_tokens,
            batch_size=config.generate_batch_size,
            show_progress=show_progress,
        )
        with _timed(timings, "refusal"):
            results["refusal_rate"] = refusal_rate(
                model, tokenizer, harmful_eval_prompts()[:n], desc="Refusal (harmful prompts)", **common
            )
            results["over_refusal_rate"] = refusal_rate(
                model, tokenizer, benign_eval_prompts()[:n], desc="Refusal (benign prompts)", **common
            )
        logger.info(
            "Refusals: %.2f of harmful, %.2f of benign prompts.", results["refusal_rate"], results["over_refusal_rate"]
        )
    if "drift" in suites:
        with _timed(timings, "drift"):
            drift = drift_probes(
                model,
                tokenizer,
                {"json": "json", "bullets": "bullets", "digits": "digits"},
                prompts,
                max_new_tokens=config.drift_max_new_tokens,
                batch_size=config.generate_batch_size,
                show_progress=show_progress,
                desc="Drift probe (generic prompts)",
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
    knowledge_items: Optional[Sequence[Union[KnowledgeItem, Mapping]]] = None,
    base: Optional[Any] = None,
    show_progress: bool = False,
    month_specs: Optional[Mapping[str, Mapping[str, Any]]] = None,
    exact_indices: Optional[Sequence[int]] = None,
    base_offscope: Optional[Mapping[str, Any]] = None,
    keep_offscope: bool = False,
    timings: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
    """Every suite of `config` on `model`; one generation pass per prompt set, shared between learning, retention
    and bleed.

    Args:
        test_sets: `{month: held-out pairs}` of the months trained so far (with an explicit `prompt` column).
        reference_logps: `{month: base log-probs}` ([`reference_logps_for`]) for the implicit-reward figure.
        knowledge_items: the knowledge pool ([`KnowledgeItem`]s or dicts with `question`, `answer`, `distractors`,
            `aliases`, `entity`); every item is scored by multiple choice. Required for the `"knowledge"` suite.
        base: the month-0 model for the KL (see [`general_suite`]).
        month_specs: `{month: spec}` of [`month_tests`] (checks, bleed checks, style signature); a month without one
            is scored by agreement and has no bleed test.
        exact_indices: indices into `knowledge_items` answered by greedy generation for the exact match (default: the
            first `config.knowledge_exact_items`).
        base_offscope: the base model's stored off-scope generations (`result["offscope_generations"]` of the month-0
            evaluation): the bleed then also reports the base's rate of each month's style on the same generic and
            knowledge prompts, and the paired difference.
        keep_offscope: store the generic and knowledge generations in the result (the campaign does it for month 0).
        timings: filled with the wall seconds of each suite, `{suite: seconds}` (`bleed`: the generic prompts'
            generations; scoring styles takes milliseconds).

    Returns:
        `dict` (JSON-able): `preference` ({month: ranking / implicit reward, see [`preference_suite`]}), `behaviour`
        ({month: per-item `scores`, `agreement`, `checks`, `summary` intervals, `scored_by`, `examples`}), `bleed`
        ({month: per-item `scores` over `counts` off-scope answers, `styles`, `summary`, `base`, `vs_base`, `note`}),
        `knowledge` (`mc`: 0/1 per pool item, `exact`: `{"items": [indices], "scores": [0/1]}`, `summary`, `examples`)
        and `general` ({metric: value}); `offscope_generations` when `keep_offscope`.
    """
    config = config or EvaluationConfig()
    suites = set(config.suites)
    test_sets = dict(test_sets or {})
    month_specs = month_specs or {}
    was_training = model.training
    model.eval()
    resamples = dict(n_resamples=config.bootstrap_resamples, seed=config.seed)

    def generate(prompts: Sequence[Any], max_new_tokens: int, desc: str) -> list[str]:
        return generate_answers(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=config.generate_batch_size,
            disable_tqdm=not show_progress,
            desc=desc,
        )

    result: dict[str, Any] = {"preference": {}, "behaviour": {}, "bleed": {}, "knowledge": {}, "general": {}}
    try:
        if "preference" in suites and test_sets:
            with _timed(timings, "preference"):
                result["preference"] = preference_suite(
                    model, tokenizer, test_sets, reference_logps, config, show_progress
                )

        behaviour = "behaviour" in suites
        tests = {month: month_tests(month_specs.get(month)) for month in test_sets} if behaviour else {}
        month_generations: dict[str, list[str]] = {}
        if behaviour:
            with _timed(timings, "behaviour"):
                for month, dataset in test_sets.items():
                    rows = list(dataset)
                    if rows and "prompt" not in rows[0]:
                        raise ValueError(
                            f"The held-out pairs of month {month!r} need a `prompt` column to generate from."
                        )
                    generations = generate(
                        [row["prompt"] for row in rows], config.behaviour_max_new_tokens, f"Behaviour {month}"
                    )
                    month_generations[month] = generations
                    entry = behaviour_scores(generations, rows, tests[month]["checks"], config)
                    entry["examples"] = [
                        {"prompt": _text(row["prompt"]), "generation": generation}
                        for row, generation in list(zip(rows, generations))[: config.behaviour_examples]
                    ]
                    result["behaviour"][month] = entry
                    logger.info(
                        "Behaviour on %s (%s): %.3f on %d prompts.",
                        month,
                        entry["scored_by"],
                        entry["summary"]["score"]["mean"],
                        entry["n"],
                    )

        # Off-scope generations: generic prompts and knowledge questions, generated once each.
        generic = generic_prompts()[: config.drift_prompts]
        generic_answers: list[str] = []
        if behaviour or keep_offscope:
            with _timed(timings, "bleed"):
                generic_answers = generate(generic, config.behaviour_max_new_tokens, "Bleed (generic prompts)")
        items = [_as_item(item) for item in knowledge_items or []]
        knowledge_answers: list[str] = []
        exact_items: list[int] = []
        if "knowledge" in suites:
            if not items:
                raise ValueError(
                    "The knowledge suite needs `knowledge_items` (see `peft_selective.demo.months.knowledge_items`)."
                )
            with _timed(timings, "knowledge"):
                mc, _ = multiple_choice_accuracy(
                    model, tokenizer, items, batch_size=max(1, 4 * config.batch_size), disable_tqdm=not show_progress
                )
                if exact_indices is None:
                    exact_indices = range(min(len(items), config.knowledge_exact_items))
                exact_items = [int(i) for i in exact_indices]
                questions = [items[i].question for i in exact_items]
                knowledge_answers = generate(questions, config.knowledge_max_new_tokens, "Knowledge (exact match)")
            exact = [int(exact_match(answer, items[i])) for answer, i in zip(knowledge_answers, exact_items)]
            result["knowledge"] = {
                "mc": [int(x) for x in mc],
                "exact": {"items": exact_items, "scores": exact},
                "summary": {"mc": _summary(mc, **resamples), "exact": _summary(exact, **resamples)},
                "examples": [
                    {"question": items[i].question, "answer": items[i].answer, "generation": answer}
                    for i, answer in list(zip(exact_items, knowledge_answers))[: config.behaviour_examples]
                ],
            }
            logger.info(
                "Knowledge: multiple choice %.3f on %d items, exact match %s on %d.",
                sum(mc) / len(mc),
                len(mc),
                f"{sum(exact) / len(exact):.3f}" if exact else "n/a",
                len(exact),
            )
        if keep_offscope:
            result["offscope_generations"] = {
                "generic": generic_answers,
                "knowledge": {"items": exact_items, "generations": knowledge_answers},
            }

        if behaviour:
            base_generic = list((base_offscope or {}).get("generic") or [])[: len(generic_answers)]
            base_knowledge = dict(
                zip(
                    (base_offscope or {}).get("knowledge", {}).get("items", []),
                    (base_offscope or {}).get("knowledge", {}).get("generations", []),
                )
            )
            for month in test_sets:
                month_test = tests[month]
                if not month_test["bleed"]:
                    result["bleed"][month] = {"styles": None, "note": month_test["note"]}
                    continue
                styles = month_test["bleed"]
                counts = {"generic": len(generic_answers), "knowledge": len(knowledge_answers)}
                scores = style_scores(generic_answers, styles) if generic_answers else []
                scores += style_scores(knowledge_answers, styles) if knowledge_answers else []
                for other, generations in month_generations.items():
                    if other != month and generations:
                        counts[other] = len(generations)
                        scores += style_scores(generations, styles)
                entry = {
                    "styles": month_test["bleed_source"],
                    "scores": [int(s) for s in scores],
                    "counts": counts,
                    "summary": _summary(scores, **resamples),
                }
                # The base's rate of the same style on the same generic and knowledge prompts (paired).
                ours, theirs = [], []
                if base_generic:
                    ours += scores[: len(base_generic)]
                    theirs += style_scores(base_generic, styles)
                offset = len(generic_answers)
                for k, i in enumerate(exact_items):
                    if i in base_knowledge:
                        ours.append(scores[offset + k])
                        theirs += style_scores([base_knowledge[i]], styles)
                if ours:
                    entry["base"] = _summary(theirs, **resamples)
                    entry["vs_base"] = _difference(ours, theirs, **resamples)
                result["bleed"][month] = entry

        result["general"] = general_suite(model, tokenizer, config, base, show_progress, timings)
    finally:
        model.train(was_training)
    return result


# ------------------------------------------------------------------------------------------------- tables
def _cell(history: Mapping[str, Any], after: str, month: str) -> Optional[dict]:
    return history.get(after, {}).get("behaviour", {}).get(month)


def retention_matrix(history: Mapping[str, Mapping[str, Any]], months: Sequence[str]) -> list[list[Optional[float]]]:
    """Behavioural R[t][i]: mean behavioural score on month i's held-out prompts after month t, from
    `history[month]["behaviour"]`; `None` for i > t or a measurement that is missing."""
    matrix = []
    for t, after in enumerate(months):
        row = []
        for i, month in enumerate(months):
            cell = _cell(history, after, month) if i <= t else None
            row.append(sum(cell["scores"]) / len(cell["scores"]) if cell and cell.get("scores") else None)
        matrix.append(row)
    return matrix


def retention_intervals(
    history: Mapping[str, Mapping[str, Any]], months: Sequence[str], n_resamples: int = 2000, seed: int = 0
) -> list[list[Optional[list[float]]]]:
    """The 95% intervals `[lo, hi]` of [`retention_matrix`]'s cells (recomputed from the stored per-item scores)."""
    matrix = []
    for t, after in enumerate(months):
        row = []
        for i, month in enumerate(months):
            cell = _cell(history, after, month) if i <= t else None
            summary = _summary(cell["scores"], n_resamples, seed) if cell and cell.get("scores") else None
            row.append(summary["ci95"] if summary else None)
        matrix.append(row)
    return matrix


def implicit_reward_matrix(
    history: Mapping[str, Mapping[str, Any]], months: Sequence[str]
) -> list[list[Optional[float]]]:
    """The DPO implicit-reward accuracy against the base on month i's pairs after month t (not a learning measure:
    it saturates long before answers change); `None` where not measured."""
    return [
        [
            history.get(after, {}).get("preference", {}).get(month, {}).get("implicit_reward_accuracy")
            if i <= t
            else None
            for i, month in enumerate(months)
        ]
        for t, after in enumerate(months)
    ]


def retention_numbers(
    history: Mapping[str, Mapping[str, Any]], months: Sequence[str], n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Average behavioural score after the last month (over the items of every month so far) and backward transfer
    (per item of the earlier months: score after the last month minus right after its own month; negative =
    forgetting), each with its 95% interval (BWT's paired: the same items). Keys: `average_accuracy`, `bwt` (floats,
    NaN where undefined), `average`, `bwt_interval` (`{"mean", "ci95", "n"}` or None)."""
    nan = {"average_accuracy": math.nan, "bwt": math.nan, "average": None, "bwt_interval": None}
    if not months:
        return nan
    last = months[-1]
    pooled = []
    for month in months:
        cell = _cell(history, last, month)
        pooled += list(cell["scores"]) if cell else []
    after, right_after = [], []
    for month in months[:-1]:
        final, own = _cell(history, last, month), _cell(history, month, month)
        if final and own and len(final["scores"]) == len(own["scores"]):
            after += final["scores"]
            right_after += own["scores"]
    average = _summary(pooled, n_resamples, seed)
    bwt = _difference(after, right_after, n_resamples, seed)
    return {
        "average_accuracy": average["mean"] if average else math.nan,
        "bwt": bwt["mean"] if bwt else math.nan,
        "average": average,
        "bwt_interval": bwt,
    }


def learning_table(
    history: Mapping[str, Mapping[str, Any]],
    months: Sequence[str],
    before: Optional[Mapping[str, Mapping[str, Any]]] = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per month: what it learned, by behaviour. `after` (score right after the month, with interval), `scored_by`,
    `agreement` and per-check rates, and, with `before[month]` (the month's behaviour scores of the model before it,
    on the same prompts), `before`, the paired `gain` and `learned` (the gain's whole interval above 0)."""
    table = {}
    for month in months:
        cell = _cell(history, month, month)
        if not cell:
            continue
        entry: dict[str, Any] = {
            "scored_by": cell.get("scored_by"),
            "after": _summary(cell["scores"], n_resamples, seed),
            "agreement": _summary(cell["agreement"], n_resamples, seed) if cell.get("agreement") else None,
            "checks": {
                name: _summary(values, n_resamples, seed) for name, values in (cell.get("checks") or {}).items()
            },
        }
        previous = (before or {}).get(month)
        if previous and len(previous.get("scores", [])) == len(cell["scores"]):
            entry["before"] = _summary(previous["scores"], n_resamples, seed)
            gain = paired_difference(cell["scores"], previous["scores"], n_resamples=n_resamples, seed=seed)
            entry["gain"] = {**gain.to_dict(), "n": gain.n}
            entry["learned"] = is_gain(gain)
        table[month] = entry
    return table


def bleed_table(history: Mapping[str, Mapping[str, Any]], months: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per month j: its style's bleed after each month t >= j (`{after: summary}`), the style tests used (`styles`),
    a `note` when it has none, and the base's rate / paired difference after the last month."""
    table = {}
    last = months[-1] if months else None
    for j, month in enumerate(months):
        entries = {after: history.get(after, {}).get("bleed", {}).get(month) for after in months[j:]}
        entries = {after: entry for after, entry in entries.items() if entry}
        if not entries:
            continue
        final = entries.get(last) or list(entries.values())[-1]
        table[month] = {
            "styles": final.get("styles"),
            "note": final.get("note"),
            "after": {after: entry.get("summary") for after, entry in entries.items() if entry.get("summary")},
            "base": final.get("base"),
            "vs_base": final.get("vs_base"),
        }
    return table


def knowledge_table(
    history: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str],
    surviving: Optional[Sequence[int]] = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Knowledge per column, re-aggregated from the stored per-item results on the same items in every column:
    multiple choice on the `surviving` pool items (default: all), exact match on the surviving items every column
    answered. Returns `{"mc": {column: summary}, "exact": {column: summary}, "n_mc", "n_exact"}`."""
    measured = [c for c in columns if history.get(c, {}).get("knowledge", {}).get("mc")]
    if not measured:
        return {"mc": {}, "exact": {}, "n_mc": 0, "n_exact": 0}
    size = min(len(history[c]["knowledge"]["mc"]) for c in measured)
    keep = [i for i in (surviving if surviving is not None else range(size)) if i < size]
    exact_sets = [set(history[c]["knowledge"].get("exact", {}).get("items", [])) for c in measured]
    common = set.intersection(*exact_sets) if exact_sets else set()
    exact_keep = [i for i in keep if i in common]
    mc, exact = {}, {}
    for column in measured:
        knowledge = history[column]["knowledge"]
        if keep:
            mc[column] = _summary([knowledge["mc"][i] for i in keep], n_resamples, seed)
        by_item = dict(zip(knowledge["exact"]["items"], knowledge["exact"]["scores"]))
        if exact_keep:
            exact[column] = _summary([by_item[i] for i in exact_keep], n_resamples, seed)
    return {"mc": mc, "exact": exact, "n_mc": len(keep), "n_exact": len(exact_keep)}


def ranking_table(history: Mapping[str, Mapping[str, Any]], months: Sequence[str]) -> dict[str, dict[str, Any]]:
    """After the last month, per month's held-out pairs: `ranking_accuracy` (`{"mean", "ci95"}`), `ranking_margin`,
    `implicit_reward_accuracy`, `n` (see [`preference_suite`])."""
    if not months:
        return {}
    scores = history.get(months[-1], {}).get("preference", {})
    keys = ("ranking_accuracy", "ranking_margin", "implicit_reward_accuracy", "n")
    return {m: {k: scores[m].get(k) for k in keys} for m in months if m in scores}


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


__all__ = [
    "GENERAL_METRICS",
    "MIN_KNOWLEDGE_ITEMS",
    "SUITES",
    "Estimate",
    "EvaluationConfig",
    "behaviour_scores",
    "bleed_table",
    "evaluate_model",
    "fit_style_signature",
    "general_suite",
    "general_table",
    "implicit_reward_matrix",
    "knowledge_table",
    "learning_table",
    "month_tests",
    "preference_suite",
    "ranking_table",
    "reference_logps_for",
    "retention_intervals",
    "retention_matrix",
    "retention_numbers",
]


def month_behaviour(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    spec: Optional[Mapping[str, Any]] = None,
    config: Optional[EvaluationConfig] = None,
    month: Optional[str] = None,
) -> dict[str, Any]:
    """The behavioural scores of `model` on one month's held-out prompts alone (the campaign measures them with the
    model before the month, for the paired gain of [`learning_table`]): what [`evaluate_model`] stores per month
    under `behaviour`, without examples. With the `month`'s name, a progress bar names it."""
    config = config or EvaluationConfig()
    rows = list(dataset)
    generations = generate_answers(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        max_new_tokens=config.behaviour_max_new_tokens,
        batch_size=config.generate_batch_size,
        disable_tqdm=month is None,
        desc=f"Behaviour {month} (before the month)",
    )
    return behaviour_scores(generations, rows, month_tests(spec)["checks"], config)


__all__.append("month_behaviour")
