"""Forgetting metrics for continual DPO: pure functions on a model and its tokenizer (no trainer needed).

| function | measures |
|---|---|
| [`preference_logps`] | per-row summed / per-token-mean log-probs of the chosen and rejected completions |
| [`preference_accuracy`] | length-fair preference accuracy and margins on held-out pairs (DPO implicit reward) |
| [`average_accuracy`], [`backward_transfer`], [`forward_learning`], [`forgetting`], [`retention_summary`], [`retention_table`], [`retention_cells`] | the R[t][i] retention matrix |
| [`perplexity`] | sliding-window perplexity on reference text (default: the standard library's `pydoc_data.topics`) |
| [`kl_to_reference`] | mean per-token KL(model ‖ reference) on prompts' next-token distributions |
| [`generate_greedy`], [`refusal_rate`] | greedy answers; share of refusals (safety retention / over-refusal) |
| [`drift_probe`] | probability mass on a token class (digits, JSON punctuation, bullets) while greedy-decoding generic prompts |

Every function works with plain transformers causal LMs and `PeftModel`s, runs under `torch.no_grad()` in eval mode
and restores the train/eval state of every module afterwards. Prompts are formatted with the tokenizer's chat template
when it has one (a `str` prompt becomes one user message), exactly as TRL's `DPOTrainer` formats conversational rows.

```python
from peft_selective.evaluation.preference import preference_accuracy, preference_logps, refusal_rate

reference = preference_logps(base_model, tokenizer, test_split)  # once per month's test split
result = preference_accuracy(model, tokenizer, test_split, reference=reference)
result["accuracy"], result["margins"]
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.chat import chat_ids, encode_prompt, resolve_chat_template
from .generation import _continues_from_cache, _forward_parameters, eos_token_ids, forward_after_cached_prefixes
from .refusal import harmful_eval_prompts, is_refusal


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = [
    "average_accuracy",
    "backward_transfer",
    "drift_probe",
    "forgetting",
    "forward_learning",
    "generate_greedy",
    "generic_prompts",
    "kl_to_reference",
    "perplexity",
    "preference_accuracy",
    "preference_logps",
    "reference_text",
    "refusal_rate",
    "retention_cells",
    "retention_summary",
    "retention_table",
    "token_class_mask",
]

# A reference for `preference_accuracy` / `kl_to_reference`: another model, precomputed log-probs (accuracy only), a
# context manager during which `model` acts as the reference, or a zero-argument callable returning one.
Reference = Union[nn.Module, Mapping[str, Any], contextlib.AbstractContextManager, Callable[[], Any]]

_GENERIC_PROMPTS = (
    "Tell me something interesting about the ocean.",
    "Write a short poem about autumn.",
    "What should I cook for dinner tonight?",
    "Explain how a bicycle works.",
    "Give me some advice for a job interview.",
    "Describe a beautiful place you would like to visit.",
    "Why is the sky blue?",
    "How can I become a better listener?",
    "Write a short story about a lost cat.",
    "What are the benefits of reading books?",
    "How do plants make their food?",
    "Suggest a fun weekend activity for a family.",
)


def generic_prompts() -> list[str]:
    """Fixed generic prompts (12) for [`drift_probe`] and as anchors for [`kl_to_reference`]: no numbers, no JSON,
    no lists asked for, so a rising share of such tokens in the answers is drift, not the prompt's doing."""
    return list(_GENERIC_PROMPTS)


def reference_text() -> str:
    """English reference text for [`perplexity`]: the standard library's `pydoc_data.topics`, joined (~465k chars).

    It ships with every Python, so no download is needed; it changes a little between Python versions, so compare
    perplexities measured with the same Python.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no grad; the train/eval flag of every module is restored afterwards."""
    modes = {module: module.training for model in models for module in model.modules()}
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def _pad_token(tokenizer: PreTrainedTokenizerBase) -> Iterator[int]:
    """Yield a pad token id, borrowing the EOS token for the duration when the tokenizer has no pad token."""
    if tokenizer.pad_token_id is not None:
        yield tokenizer.pad_token_id
        return
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.pad_token = None


def _pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = _model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    # Prompt-learning PEFT methods prepend virtual tokens to the outputs: keep the positions of the real tokens.
    return logits[:, -input_ids.shape[1] :]


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, one row at a time (a full-vocabulary fp32 log-softmax of the batch is large)."""
    return torch.stack(
        [row.float().log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1) for row, tgt in zip(logits, targets)]
    )


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rows(dataset: Any) -> list[dict]:
    if isinstance(dataset, Mapping) and "prompt" in dataset:  # a single row
        return [dict(dataset)]
    return [dict(row) for row in dataset]


# ---------------------------------------------------------------------------------------------------------------------
# Preference log-probs and accuracy
# ---------------------------------------------------------------------------------------------------------------------


def _tokenize_pair(tokenizer: PreTrainedTokenizerBase, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen completion ids, rejected completion ids), as TRL's `DPOTrainer` tokenizes a row."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError("`prompt`, `chosen` and `rejected` must all be strings or all be lists of messages.")
    if isinstance(prompt, str):
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        chosen_ids = list(tokenizer(text=prompt + chosen)["input_ids"])
        rejected_ids = list(tokenizer(text=prompt + rejected)["input_ids"])
    else:
        prompt_ids = chat_ids(tokenizer, list(prompt), add_generation_prompt=True)
        chosen_ids = chat_ids(tokenizer, list(prompt) + list(chosen))
        rejected_ids = chat_ids(tokenizer, list(prompt) + list(rejected))
    # The completion starts where prompt and prompt+completion diverge (TRL does the same).
    n = min(_common_prefix_length(prompt_ids, chosen_ids), _common_prefix_length(prompt_ids, rejected_ids))
    return prompt_ids[:n], chosen_ids[n:], rejected_ids[n:]


def preference_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    batch_size: int = 8,
    max_length: Optional[int] = 512,
    show_progress: bool = False,
    desc: str = "Preference log-probs",
) -> dict[str, torch.Tensor]:
    """Log-probabilities of the chosen and rejected completions given the prompt, per row.

    Rows are tokenized as TRL's `DPOTrainer` does: conversational rows (`prompt` / `chosen` / `rejected` lists of
    messages) through the tokenizer's chat template, the completion being what `prompt + chosen` adds to the prompt
    with its generation prompt (so the template's end-of-turn tokens count); plain-text rows with an EOS token added
    to the completions. Prompt tokens are masked; prompt + completion is truncated to `max_length` keeping the start
    (TRL's default `truncation_mode="keep_start"`). Summed log-probs are what DPO compares; the per-token means are
    length-fair. A completion truncated away entirely gets a sum of 0 and a mean of NaN.

    A pair's prompt goes through the model once for both completions, which continue from its KV cache, and logits
    are computed only where a completion token is scored (the numbers of the whole sequences, up to float rounding).
    A batch with a prompt that is empty or fills `max_length`, or a model that cannot continue a cache at explicit
    positions (prompt-learning PEFT adapters), is scored one whole sequence per completion.

    Args:
        model: a causal LM (`PreTrainedModel` or `PeftModel`).
        tokenizer: its tokenizer.
        dataset: a `datasets.Dataset` or a list of rows with `prompt`, `chosen` and `rejected` (other columns ignored).
        batch_size (`int`, defaults to 8): pairs per forward pass (each pass scores 2 * batch_size sequences).
        max_length (`int`, *optional*, defaults to 512): truncation length of prompt + completion; `None`: none.
        show_progress (`bool`, defaults to `False`), desc (`str`): a progress bar over the pairs, and its label.

    Returns:
        `dict[str, torch.Tensor]` of shape `(n_rows,)`, on the CPU: `chosen_logps`, `rejected_logps` (sums, float64),
        `chosen_mean_logps`, `rejected_mean_logps` (float64), `chosen_tokens`, `rejected_tokens` (int64).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    rows = _rows(dataset)
    keys = ("chosen_logps", "rejected_logps", "chosen_mean_logps", "rejected_mean_logps")
    out: dict[str, list] = {key: [] for key in (*keys, "chosen_tokens", "rejected_tokens")}
    shares_prompts = _continues_from_cache(model)
    with (
        _eval_mode(model),
        _pad_token(tokenizer) as pad_id,
        tqdm(total=len(rows), desc=desc, disable=not show_progress) as progress,
    ):
        for start in range(0, len(rows), batch_size):
            batch = [_tokenize_pair(tokenizer, row) for row in rows[start : start + batch_size]]
            limit = math.inf if max_length is None else max_length
            if shares_prompts and all(0 < len(p) < limit and c and r for p, c, r in batch):
                sums, counts = _pair_logps_sharing_prompts(model, batch, max_length, pad_id)
            else:
                sums, counts = _pair_logps_of_sequences(model, batch, max_length, pad_id)
            means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))
            n = len(batch)
            out["chosen_logps"].append(sums[:n])
            out["rejected_logps"].append(sums[n:])
            out["chosen_mean_logps"].append(means[:n])
            out["rejected_mean_logps"].append(means[n:])
            out["chosen_tokens"].append(counts[:n].long())
            out["rejected_tokens"].append(counts[n:].long())
            progress.update(n)
    if not rows:
        return {
            key: torch.zeros(0, dtype=torch.long if key.endswith("tokens") else torch.float64) for key in out.keys()
        }
    return {key: torch.cat(values) for key, values in out.items()}


def _pair_logps_of_sequences(
    model: nn.Module, batch: list[tuple[list[int], list[int], list[int]]], max_length: Optional[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and scored tokens of the pairs' chosen then rejected sequences, each scored whole
    (right padding, truncated to `max_length`)."""
    sequences, masks = [], []
    for side in (1, 2):  # chosen, then rejected
        for pair in batch:
            prompt_ids, completion_ids = pair[0], pair[side]
            seq = prompt_ids + completion_ids
            mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
            if max_length is not None:
                seq, mask = seq[:max_length], mask[:max_length]
            sequences.append(seq)
            masks.append(mask)
    input_ids, attention_mask = _pad_right(sequences, pad_id)
    completion_mask, _ = _pad_right(masks, 0)
    logits = _forward_logits(model, input_ids, attention_mask)
    logps = _token_logps(logits[:, :-1], input_ids[:, 1:].to(logits.device)).double().cpu()
    mask = completion_mask[:, 1:].double()
    return (logps * mask).sum(-1), mask.sum(-1)


def _pair_logps_sharing_prompts(
    model: nn.Module, batch: list[tuple[list[int], list[int], list[int]]], max_length: Optional[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`_pair_logps_of_sequences`] reading each prompt once: the prompts (left-padded, ending together) with a KV
    cache, then both completions of each pair from its prompt's cache (right-padded). Needs non-empty prompts shorter
    than `max_length` and non-empty completions."""
    device = _model_device(model)
    prompts = [prompt for prompt, _, _ in batch]
    width = max(len(ids) for ids in prompts)
    prompt_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[row, width - len(ids) :] = 1
    keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
    out = model(
        input_ids=prompt_ids.to(device),
        attention_mask=prompt_mask.to(device),
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        use_cache=True,
        **keep_logits,
    )
    first = out.logits[:, -1].float().log_softmax(-1).cpu()  # each completion's first token
    cache = out.past_key_values

    # chosen then rejected, each kept up to `max_length` with its prompt
    completions = [pair[side] for side in (1, 2) for pair in batch]
    source = list(range(len(batch))) * 2
    if max_length is not None:
        completions = [ids[: max_length - len(prompts[g])] for g, ids in zip(source, completions)]
    counts = torch.tensor([len(ids) for ids in completions], dtype=torch.float64)
    sums = torch.tensor([first[g, ids[0]].item() for g, ids in zip(source, completions)], dtype=torch.float64)
    length = max(len(ids) for ids in completions) - 1  # a completion's last token is only predicted
    if length > 0:
        logits, targets, mask = forward_after_cached_prefixes(
            model, cache, prompt_mask, torch.tensor(source), completions, pad_id
        )
        logps = _token_logps(logits, targets.to(logits.device)).double().cpu()
        sums += (logps * mask.double()).sum(-1)
    return sums, counts


def _reference_logps(
    reference: Reference,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    n_rows: int,
    batch_size: int,
    max_length: Optional[int],
) -> dict[str, torch.Tensor]:
    if isinstance(reference, nn.Module):
        return preference_logps(reference, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    if isinstance(reference, Mapping):
        missing = [key for key in ("chosen_logps", "rejected_logps") if key not in reference]
        if missing:
            raise ValueError(f"Precomputed reference log-probs lack {missing}; pass what `preference_logps` returns.")
        ref = {key: torch.as_tensor(value, dtype=torch.float64).cpu() for key, value in reference.items()}
        if ref["chosen_logps"].shape != (n_rows,) or ref["rejected_logps"].shape != (n_rows,):
            raise ValueError(
                f"Precomputed reference log-probs have shape {tuple(ref['chosen_logps'].shape)}, expected ({n_rows},): "
                "they must come from the same rows, in the same order."
            )
        return ref
    if hasattr(reference, "__enter__"):  # a context manager, e.g. `peft_model.disable_adapter()`
        with reference:
            return preference_logps(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    if callable(reference):  # a factory of context managers, e.g. `peft_model.disable_adapter`
        with reference():
            return preference_logps(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    raise TypeError(
        f"`reference` must be a model, precomputed log-probs, a context manager or a callable, got {type(reference)}."
    )


def preference_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    reference: Optional[Reference] = None,
    batch_size: int = 8,
    max_length: Optional[int] = 512,
    show_progress: bool = False,
    desc: str = "Preference accuracy",
) -> dict[str, Any]:
    """Length-fair preference accuracy on held-out pairs: how often the model prefers the chosen completion.

    - With a `reference`, the DPO implicit-reward margin: margin = (logp_c - ref_c) - (logp_r - ref_r) on summed
      log-probs. The reference cancels the length and prior-likelihood bias of each completion, so this measures what
      training changed. `reference` is another model, precomputed log-probs from [`preference_logps`] (compute them
      once per test split and reuse them for every month: then R[t][i] are comparable across t), a context manager
      during which `model` acts as the reference (`peft_model.disable_adapter()`), or a callable returning one
      (`peft_model.disable_adapter`).
    - Without one, the margin compares mean per-token log-probs: mean_c - mean_r. Summed log-probs would favour the
      shorter completion before any training (a one-word chosen beats a verbose rejected).

    The accuracy is the share of rows with margin > 0. **Ties count as wrong**: with the model as its own reference
    every margin is exactly 0 and the accuracy is 0, so the "before training" point of the reference mode is 0 by
    construction (use the mean-log-prob mode for a zero-shot score). NaN margins (completion truncated away) count as
    wrong too.

    Args:
        model: a causal LM (`PreTrainedModel` or `PeftModel`).
        tokenizer: its tokenizer.
        dataset: rows with `prompt`, `chosen`, `rejected` (see [`preference_logps`]).
        reference (*optional*): see above.
        batch_size (`int`, defaults to 8), max_length (`int`, *optional*, defaults to 512): see [`preference_logps`].
        show_progress (`bool`, defaults to `False`), desc (`str`): a progress bar over the model's pairs, its label.

    Returns:
        `dict`: `accuracy` (`float`), `margins` (`torch.Tensor` `(n_rows,)`), `mean_margin` (`float`), `mode`
        (`"reference"` or `"mean_logp"`), `n` (`int`), `logps` (the model's [`preference_logps`]) and
        `reference_logps` (the reference's, or `None`).
    """
    rows = _rows(dataset)
    if not rows:
        raise ValueError("`dataset` is empty.")
    policy = preference_logps(
        model, tokenizer, rows, batch_size=batch_size, max_length=max_length, show_progress=show_progress, desc=desc
    )
    if reference is None:
        ref = None
        margins = policy["chosen_mean_logps"] - policy["rejected_mean_logps"]
        mode = "mean_logp"
    else:
        ref = _reference_logps(reference, model, tokenizer, rows, len(rows), batch_size, max_length)
        margins = (policy["chosen_logps"] - ref["chosen_logps"]) - (policy["rejected_logps"] - ref["rejected_logps"])
        mode = "reference"
    return {
        "accuracy": (margins > 0).double().mean().item(),
        "margins": margins,
        "mean_margin": margins.nanmean().item(),
        "mode": mode,
        "n": len(rows),
        "logps": policy,
        "reference_logps": ref,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The retention matrix
# ---------------------------------------------------------------------------------------------------------------------


def _value(x: Any) -> float:
    return math.nan if x is None else float(x)


def _as_matrix(R: Any) -> tuple[list[list[float]], list[str]]:
    """Normalize R to a rectangular float matrix (NaN for missing cells) and the month names (columns)."""
    if isinstance(R, Mapping):
        row_names = [str(name) for name in R]
        names = list(row_names)
        for row in R.values():
            if isinstance(row, Mapping):
                names += [str(k) for k in row if not isinstance(k, int) and str(k) not in names]
        matrix = []
        for row in R.values():
            if isinstance(row, Mapping):
                by_name = {str(k): v for k, v in row.items() if not isinstance(k, int)}
                by_index = {k: v for k, v in row.items() if isinstance(k, int)}
                matrix.append([_value(by_name.get(name, by_index.get(i))) for i, name in enumerate(names)])
            else:
                matrix.append([_value(v) for v in row])
    else:
        matrix = [[_value(v) for v in row] for row in R]
        names = []
    if not matrix:
        raise ValueError("The retention matrix is empty.")
    width = max(len(matrix), max(len(row) for row in matrix), len(names))
    matrix = [row + [math.nan] * (width - len(row)) for row in matrix]
    names = names + [f"month {i}" for i in range(len(names), width)]
    return matrix, names


def _baseline(baseline: Any, names: list[str]) -> list[float]:
    if baseline is None:
        return [math.nan] * len(names)
    if isinstance(baseline, Mapping):
        return [_value(baseline.get(name, baseline.get(i))) for i, name in enumerate(names)]
    values = [_value(v) for v in baseline]
    return values + [math.nan] * (len(names) - len(values))


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def average_accuracy(R: Any) -> float:
    """Average score on all months trained so far, after the last one: mean_{i<=T} R[T][i].

    Args:
        R: the retention matrix, `R[t][i]` = score on month i's held-out data after training month t. A list of lists
            (rows may stop at the diagonal; `None` for a missing cell) or a dict of dicts keyed by month name, e.g.
            `{"safety": {"safety": 0.9}, "capitals": {"safety": 0.7, "capitals": 0.95}}` (rows in training order).

    Returns:
        `float` (NaN cells are skipped; NaN if there are none).
    """
    matrix, _ = _as_matrix(R)
    last = len(matrix) - 1
    return _nanmean(matrix[last][: last + 1])


def backward_transfer(R: Any) -> float:
    """Backward transfer BWT = mean_{i<T} (R[T][i] - R[i][i]): negative = forgetting of earlier months.

    NaN with a single month (nothing earlier). See [`average_accuracy`] for the format of `R`.
    """
    matrix, _ = _as_matrix(R)
    last = len(matrix) - 1
    return _nanmean([matrix[last][i] - matrix[i][i] for i in range(last)])


def forward_learning(R: Any, baseline: Any = None) -> float:
    """How much each month learned: mean_i (R[i][i] - before_i).

    before_i is R[i-1][i] (month i's score just before training on it) when that cell was measured, else
    `baseline[i]` (the untrained model's score on month i); months with neither are skipped.

    Args:
        R: the retention matrix (see [`average_accuracy`]).
        baseline (*optional*): scores of the model before any training, one per month (list or dict by name).

    Returns:
        `float` (NaN if no month has a "before" score).
    """
    matrix, names = _as_matrix(R)
    base = _baseline(baseline, names)
    gains = []
    for i in range(len(matrix)):
        before = matrix[i - 1][i] if i > 0 else math.nan
        if math.isnan(before):
            before = base[i]
        gains.append(matrix[i][i] - before)
    return _nanmean(gains)


def forgetting(R: Any) -> float:
    """Average forgetting: mean_{i<T} (max_{i<=t<T} R[t][i] - R[T][i]), the drop from each earlier month's best.

    NaN with a single month. See [`average_accuracy`] for the format of `R`.
    """
    matrix, _ = _as_matrix(R)
    last = len(matrix) - 1
    drops = []
    for i in range(last):
        best = [matrix[t][i] for t in range(i, last) if not math.isnan(matrix[t][i])]
        if best:
            drops.append(max(best) - matrix[last][i])
    return _nanmean(drops)


def retention_summary(R: Any, baseline: Any = None) -> dict[str, Any]:
    """All retention numbers at once.

    Returns:
        `dict`: `average_accuracy`, `bwt`, `forward_learning`, `forgetting` (floats, NaN where undefined),
        `n_months` (rows of R) and `names` (column names).
    """
    matrix, names = _as_matrix(R)
    return {
        "average_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forward_learning": forward_learning(matrix, _baseline(baseline, names)),
        "forgetting": forgetting(matrix),
        "n_months": len(matrix),
        "names": names,
    }


def _retention_cell(
    value: Optional[float],
    ci: Optional[Sequence[float]] = None,
    bold: bool = False,
    digits: int = 3,
    missing: str = "–",
) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    text = f"{value:.{digits}f}"
    text = f"**{text}**" if bold else text
    return text if ci is None else f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def retention_cells(
    R: Sequence[Sequence[Optional[float]]],
    ci95: Optional[Sequence[Sequence[Optional[Sequence[float]]]]] = None,
    digits: int = 3,
    bold_diagonal: bool = True,
    missing: str = "–",
    unreached: Optional[str] = None,
) -> list[list[str]]:
    """The cells of a retention matrix as text, row t (after month t) by column i (month i): the one renderer of
    R[t][i] behind [`retention_table`], the campaign's report and the model card.

    Args:
        R: the matrix as a list of rows (`None` or NaN for a cell not measured).
        ci95 (*optional*): the cells' 95% intervals `[lo, hi]` (same shape, `None` where there is none), written
            after a measured value as ` [lo, hi]`.
        digits (`int`, defaults to 3): decimals.
        bold_diagonal (`bool`, defaults to `True`): the month just trained (i == t) in bold.
        missing (`str`, defaults to `"–"`): the text of a cell not measured.
        unreached (`str`, *optional*): the text of every cell i > t (a month not trained yet), measured or not;
            default: such cells are rendered like the others (a score before the month trained is shown).
    """
    rows = []
    for t, row in enumerate(R):
        cells = []
        for i, value in enumerate(row):
            if i > t and unreached is not None:
                cells.append(unreached)
                continue
            ci = ci95[t][i] if ci95 is not None else None
            cells.append(_retention_cell(value, ci, bold=bold_diagonal and i == t, digits=digits, missing=missing))
        rows.append(cells)
    return rows


def retention_table(R: Any, names: Optional[Sequence[str]] = None, baseline: Any = None, digits: int = 3) -> str:
    """Render R as a markdown table (rows: after month t; columns: evaluated on month i; diagonal in bold), followed
    by a line with the average accuracy, BWT, forward learning and forgetting.

    Args:
        R: the retention matrix (see [`average_accuracy`]).
        names (*optional*): month names; default: the dict keys of R, or "month 0", "month 1", ...
        baseline (*optional*): scores before any training, shown as a first "before training" row.
        digits (`int`, defaults to 3): decimals.

    Returns:
        `str`: markdown.
    """
    matrix, default_names = _as_matrix(R)
    names = list(names) if names is not None else default_names
    if len(names) < len(default_names):
        raise ValueError(f"{len(names)} names for {len(default_names)} months.")

    def cell(value: float) -> str:
        return _retention_cell(value, digits=digits, missing="–")

    lines = [
        "| after \\ on | " + " | ".join(names[: len(default_names)]) + " |",
        "|---" * (len(default_names) + 1) + "|",
    ]
    if baseline is not None:
        lines.append("| before training | " + " | ".join(cell(v) for v in _baseline(baseline, default_names)) + " |")
    for t, cells in enumerate(retention_cells(matrix, digits=digits, missing="–")):
        lines.append(f"| {names[t]} | " + " | ".join(cells) + " |")
    summary = retention_summary(matrix, baseline=_baseline(baseline, default_names))

    def signed(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:+.{digits}f}"

    lines.append("")
    lines.append(
        f"Average accuracy: {cell(summary['average_accuracy'])} · BWT: {signed(summary['bwt'])} · "
        f"forward learning: {signed(summary['forward_learning'])} · forgetting: {cell(summary['forgetting'])}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Perplexity and KL
# ---------------------------------------------------------------------------------------------------------------------


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: Optional[str] = None,
    max_length: int = 512,
    stride: int = 512,
    max_tokens: Optional[int] = None,
    batch_size: int = 4,
    show_progress: bool = False,
    desc: str = "Perplexity",
) -> float:
    """Sliding-window perplexity of `text` (default: [`reference_text`]).

    The text is tokenized without special tokens and cut to `max_tokens` tokens. Windows of `max_length` tokens start
    every `stride` tokens; each window scores only the tokens no earlier window scored, with the rest of the window as
    context (`stride == max_length`: disjoint windows, whose first tokens go unscored; `stride < max_length`: every
    token after the first is scored with at least `max_length - stride` tokens of context, slower). Perplexity =
    exp(total NLL / scored tokens).

    On the bundled SmolLM2-135M the full default text is ~110k tokens; `max_tokens=16384` takes a few seconds on a
    GPU, tens of seconds on a CPU, and moves by well under 1% relative to the full text: compare runs with the same
    `max_tokens`, `max_length` and `stride`.

    Args:
        model: a causal LM. tokenizer: its tokenizer.
        text (`str`, *optional*): the text; default [`reference_text`]`()`.
        max_length (`int`, defaults to 512): window length in tokens.
        stride (`int`, defaults to 512): step between windows, at most `max_length`.
        max_tokens (`int`, *optional*): cap on the number of tokens of the text.
        batch_size (`int`, defaults to 4): windows per forward pass.
        show_progress (`bool`, defaults to `False`), desc (`str`): a progress bar over the windows, and its label.

    Returns:
        `float`
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"Need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}.")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    text = reference_text() if text is None else text
    if max_tokens is not None:
        text = text[: max_tokens * 32]  # no token is longer than 32 characters in practice; saves tokenizing it all
    ids = list(tokenizer(text=text, add_special_tokens=False, verbose=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("The text is shorter than 2 tokens.")

    windows = []  # (token ids, number of leading tokens used as context only)
    previous_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        windows.append((ids[begin:end], previous_end - begin))
        previous_end = end
        if end == len(ids):
            break

    total_nll, n_scored = 0.0, 0
    with (
        _eval_mode(model),
        _pad_token(tokenizer) as pad_id,
        tqdm(total=len(windows), desc=desc, disable=not show_progress) as progress,
    ):
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            input_ids, attention_mask = _pad_right([w for w, _ in batch], pad_id)
            logits = _forward_logits(model, input_ids, attention_mask)
            logps = _token_logps(logits[:, :-1], input_ids[:, 1:].to(logits.device)).double().cpu()
            score = attention_mask[:, 1:].clone()
            for row, (_, n_context) in enumerate(batch):
                # target position p (token p + 1) is scored when the token index p + 1 >= n_context
                score[row, : max(n_context - 1, 0)] = 0
            total_nll -= (logps * score).sum().item()
            n_scored += int(score.sum())
            progress.update(len(batch))
    return math.exp(total_nll / n_scored)


def _prompt_batches(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Union[str, list]],
    batch_size: int,
    use_chat_template: Optional[bool],
    max_length: Optional[int] = None,
) -> Iterator[list[list[int]]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of prompts, not a single string.")
    if len(prompts) == 0:
        raise ValueError("`prompts` is empty.")
    template = resolve_chat_template(tokenizer, use_chat_template)
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(tokenizer, prompt, template) for prompt in prompts[start : start + batch_size]]
        if max_length is not None:
            batch = [ids[-max_length:] for ids in batch]  # keep the end: the generation prompt matters most
        yield batch


def _kl_rows(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, from logits (fp32)."""
    logp = policy_logits.float().log_softmax(-1)
    logq = reference_logits.float().log_softmax(-1).to(logp.device)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_to_reference(
    model: PreTrainedModel,
    reference: Reference,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Optional[Sequence[Union[str, list]]] = None,
    batch_size: int = 8,
    max_length: Optional[int] = 512,
    last_token_only: bool = False,
    use_chat_template: Optional[bool] = None,
    show_progress: bool = False,
    desc: str = "KL to the reference",
) -> float:
    """Mean per-token KL(model ‖ reference) of the next-token distributions over the prompts' positions.

    Each prompt is formatted like a generation prompt (chat template with the assistant header, when the tokenizer has
    one); the KL of the full-vocabulary next-token distributions is averaged over every (non-padding) position of
    every prompt, or only over the last position (the distribution of the answer's first token) with
    `last_token_only=True`. The direction is the one DPO/RLHF penalise, KL(π ‖ π_ref) = Σ_v π (log π - log π_ref).

    Args:
        model: the fine-tuned causal LM (`PreTrainedModel` or `PeftModel`).
        reference: the reference: another model (on any device), a zero-argument callable returning a context manager
            during which `model` acts as the reference (e.g. `peft_model.disable_adapter`, or `lambda:
            peft_model.use_adapter("ref")`-style switches; entered once per batch), or such a context manager itself
            (entered once; the reference distributions of all prompts are then held in memory, so prefer the
            callable for many prompts).
        tokenizer: the tokenizer (shared by both models).
        prompts (*optional*): strings (one user message each) or lists of messages; default [`generic_prompts`]`()`.
        batch_size (`int`, defaults to 8): prompts per forward pass.
        max_length (`int`, *optional*, defaults to 512): prompts are cut to their last `max_length` tokens.
        last_token_only (`bool`, defaults to `False`): average over the last position of each prompt only.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.
        show_progress (`bool`, defaults to `False`), desc (`str`): a progress bar over the prompts, and its label.

    Returns:
        `float`: mean KL in nats per token (0 when the model equals the reference).
    """
    prompts = generic_prompts() if prompts is None else prompts
    batches = list(_prompt_batches(tokenizer, prompts, batch_size, use_chat_template, max_length))
    total, count = 0.0, 0

    def accumulate(kl: torch.Tensor, attention_mask: torch.Tensor) -> None:
        nonlocal total, count
        mask = attention_mask.to(kl.device).double()
        if last_token_only:
            last = attention_mask.sum(-1) - 1
            mask = torch.zeros_like(mask)
            mask[torch.arange(mask.shape[0]), last.to(mask.device)] = 1
        total += (kl.double() * mask).sum().item()
        count += int(mask.sum())

    models = [model] + ([reference] if isinstance(reference, nn.Module) else [])
    with (
        _eval_mode(*models),
        _pad_token(tokenizer) as pad_id,
        tqdm(total=len(prompts), desc=desc, disable=not show_progress) as progress,
    ):
        padded = [_pad_right(batch, pad_id) for batch in batches]
        if isinstance(reference, nn.Module) or (callable(reference) and not hasattr(reference, "__enter__")):
            for input_ids, attention_mask in padded:
                policy_logits = _forward_logits(model, input_ids, attention_mask)
                if isinstance(reference, nn.Module):
                    reference_logits = _forward_logits(reference, input_ids, attention_mask)
                else:
                    with reference():
                        reference_logits = _forward_logits(model, input_ids, attention_mask)
                accumulate(_kl_rows(policy_logits, reference_logits), attention_mask)
                progress.update(len(input_ids))
        elif hasattr(reference, "__enter__"):
            with reference:
                reference_logits = [_forward_logits(model, ids, mask).float().cpu() for ids, mask in padded]
            for (input_ids, attention_mask), ref_logits in zip(padded, reference_logits):
                policy_logits = _forward_logits(model, input_ids, attention_mask)
                accumulate(_kl_rows(policy_logits, ref_logits), attention_mask)
                progress.update(len(input_ids))
        else:
            raise TypeError(
                f"`reference` must be a model, a context manager or a callable returning one, got {type(reference)}."
            )
    return total / count


# ---------------------------------------------------------------------------------------------------------------------
# Generation probes
# ---------------------------------------------------------------------------------------------------------------------


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Union[str, list]],
    max_new_tokens: int,
    batch_size: int,
    use_chat_template: Optional[bool],
    output_logits: bool = False,
    show_progress: bool = False,
    desc: str = "Generating",
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, ...]]]]:
    """Greedy-decode left-padded batches; yield (the batch's prompt indices, generated ids, valid-position mask,
    per-step logits or None).

    Prompts are batched by length, as [`peft_selective.evaluation.generate_answers`] batches them (less padding, and
    the same batches: the same answers). A generated position is valid up to and including the first EOS token of its
    row.
    """
    eos = eos_token_ids(model, tokenizer)
    device = _model_device(model)
    encoded = [ids for batch in _prompt_batches(tokenizer, prompts, batch_size, use_chat_template) for ids in batch]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    with (
        _eval_mode(model),
        _pad_token(tokenizer) as pad_id,
        tqdm(total=len(encoded), desc=desc, disable=not show_progress) as progress,
    ):
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = [encoded[i] for i in indices]
            length = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding: generation continues right after every prompt
                input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, length - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                return_dict_in_generate=True,
                output_logits=output_logits,
            )
            generated = output.sequences[:, length:].cpu()
            is_eos = torch.zeros_like(generated, dtype=torch.bool)
            for eos_id in eos:
                is_eos |= generated == eos_id
            # valid: no EOS strictly before this position
            eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
            valid = eos_before == 0
            yield indices, generated, valid, (output.logits if output_logits else None)
            progress.update(len(indices))


def _decode(tokenizer: PreTrainedTokenizerBase, generated: torch.Tensor, valid: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(row[mask].tolist(), skip_special_tokens=True).strip() for row, mask in zip(generated, valid)
    ]


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Union[str, list]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    use_chat_template: Optional[bool] = None,
    show_progress: bool = False,
    desc: str = "Generating",
) -> list[str]:
    """Greedy answers to `prompts` (strings as one user message each, or lists of messages), chat template applied
    when the tokenizer has one, left-padded batches; the text after the prompt up to the first EOS, stripped. The one
    generation routine of the package: [`peft_selective.evaluation.generate_answers`], without a progress bar unless
    `show_progress` (labelled `desc`)."""
    from . import generate_answers

    return generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        use_chat_template=use_chat_template, disable_tqdm=not show_progress, desc=desc,
    )  # fmt: skip


def refusal_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Optional[Sequence[Union[str, list]]] = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    use_chat_template: Optional[bool] = None,
    show_progress: bool = False,
    desc: str = "Refusal",
) -> float:
    """Share of `prompts` whose greedy answer is a refusal ([`peft_selective.evaluation.refusal.is_refusal`]).

    Default prompts: [`peft_selective.evaluation.refusal.harmful_eval_prompts`] (safety retention: should stay near 1 after a safety
    month); pass [`peft_selective.evaluation.refusal.benign_eval_prompts`] to measure over-refusal (should stay near 0). 48 new tokens are
    enough for the opening sentence, where refusals are phrased. For the generations themselves, call
    [`generate_greedy`] and [`peft_selective.evaluation.refusal.is_refusal`]. `show_progress`: a progress bar labelled
    `desc`.
    """
    prompts = harmful_eval_prompts() if prompts is None else prompts
    answers = generate_greedy(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        use_chat_template,
        show_progress=show_progress,
        desc=desc,
    )
    return sum(is_refusal(answer) for answer in answers) / len(answers)


_JSON_CHARS = frozenset('{}[]"')
_BULLET_CHARS = frozenset("-*•")
TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    # any token that contains a digit ("7", " 2024", "1st")
    "digits": lambda token: any(char.isdigit() for char in token),
    # JSON structure: braces, brackets, double quotes
    "json": lambda token: any(char in _JSON_CHARS for char in token),
    # list bullets: tokens made of "-", "*", "•" and whitespace only (also catches a lone hyphen in a word)
    "bullets": lambda token: bool(token.strip()) and all(char in _BULLET_CHARS for char in token.strip()),
}


def token_class_mask(
    tokenizer: PreTrainedTokenizerBase,
    token_class: Union[Callable[[str], bool], str],
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Boolean mask over the vocabulary of the tokens in `token_class`.

    Each token id is decoded on its own (`tokenizer.decode([id])`, leading spaces kept) and passed to the predicate.
    Special tokens are never in the class; ids >= `len(tokenizer)` (padding of the embedding matrix) neither.

    Args:
        tokenizer: the tokenizer.
        token_class: a predicate on the decoded token text, or a preset name: `"digits"`, `"json"` (`{}[]"`) or
            `"bullets"` (`-`, `*`, `•`).
        vocab_size (`int`, *optional*): length of the mask (the model's output size); default `len(tokenizer)`.

    Returns:
        `torch.Tensor` of dtype bool, shape `(vocab_size,)`.
    """
    if isinstance(token_class, str):
        if token_class not in TOKEN_CLASSES:
            raise ValueError(
                f"Unknown token class {token_class!r}; choose from {sorted(TOKEN_CLASSES)} or a callable."
            )
        token_class = TOKEN_CLASSES[token_class]
    n_tokens = len(tokenizer)
    vocab_size = n_tokens if vocab_size is None else vocab_size
    texts = tokenizer.batch_decode([[i] for i in range(min(n_tokens, vocab_size))], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, text in enumerate(texts):
        if i not in special and token_class(text):
            mask[i] = True
    return mask


def drift_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Optional[Sequence[Union[str, list]]] = None,
    token_class: Union[Callable[[str], bool], str] = "digits",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    use_chat_template: Optional[bool] = None,
) -> dict[str, Any]:
    """The drift diagnostic of Zhu, Hoiem et al. (2025): probability mass on a token class during greedy decoding.

    On fixed generic prompts (default [`generic_prompts`]) the model greedy-decodes; at every generated position (up
    to and including the EOS) the probability it gives to the tokens of `token_class` is summed over the class.
    Averaged over positions, this is small for a healthy model; a month whose data over-represents the class (numbers
    after a counting task, `{"` after the JSON-currency month, bullets after the languages month) makes it rise on
    unrelated prompts long before accuracy metrics move: rising mass is the alarm. Compare against the value of the
    model before the month (month 0 = the base model).

    Args:
        model: a causal LM (`PreTrainedModel` or `PeftModel`). tokenizer: its tokenizer.
        prompts (*optional*): strings or lists of messages; default [`generic_prompts`]`()`.
        token_class: a predicate on decoded token text or `"digits"` / `"json"` / `"bullets"` (see
            [`token_class_mask`]).
        max_new_tokens (`int`, defaults to 32): generation length.
        batch_size (`int`, defaults to 8): prompts per generate call.
        use_chat_template (`bool`, *optional*): default: when the tokenizer has a chat template.

    Returns:
        `dict`: `mass` (mean class probability over all generated positions), `per_prompt` (`list[float]`, the mean
        per prompt), `greedy_fraction` (share of generated tokens in the class), `n_positions`, `class_size` (tokens in
        the class) and `generations` (`list[str]`).
    """
    return drift_probes(
        model, tokenizer, {"mass": token_class}, prompts, max_new_tokens, batch_size, use_chat_template
    )["mass"]


def drift_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_classes: Mapping[str, Union[Callable[[str], bool], str]],
    prompts: Optional[Sequence[Union[str, list]]] = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    use_chat_template: Optional[bool] = None,
    show_progress: bool = False,
    desc: str = "Drift probe",
) -> dict[str, dict[str, Any]]:
    """[`drift_probe`] for several token classes from one greedy decoding: `{name: drift_probe-style dict}`, e.g.
    `drift_probes(model, tokenizer, {"json": "json", "bullets": "bullets"})`. Its `generations` are the greedy answers
    [`generate_greedy`] gives with the same `batch_size` (the same batches). `show_progress`: a bar labelled `desc`."""
    prompts = generic_prompts() if prompts is None else prompts
    masks: dict[str, torch.Tensor] = {}
    totals = {name: {"per_prompt": [math.nan] * len(prompts), "mass": 0.0, "hits": 0} for name in token_classes}
    generations: list[str] = [""] * len(prompts)
    n_positions = 0
    for indices, generated, valid, logits in _generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, use_chat_template, True, show_progress, desc
    ):
        probs = torch.stack(logits, dim=1).float().softmax(-1)  # (batch, steps, vocab)
        valid_f = valid.double()
        for name, token_class in token_classes.items():
            if name not in masks:
                masks[name] = token_class_mask(tokenizer, token_class, vocab_size=probs.shape[-1])
            class_mass = (probs * masks[name].to(probs.device)).sum(-1).double().cpu()  # (batch, steps)
            for row, i in enumerate(indices):
                n = int(valid[row].sum())
                totals[name]["per_prompt"][i] = (class_mass[row] * valid_f[row]).sum().item() / n if n else math.nan
            totals[name]["mass"] += (class_mass * valid_f).sum().item()
            totals[name]["hits"] += int((masks[name][generated] & valid).sum())
        n_positions += int(valid.sum())
        for i, text in zip(indices, _decode(tokenizer, generated, valid)):
            generations[i] = text
    return {
        name: {
            "mass": total["mass"] / n_positions if n_positions else math.nan,
            "per_prompt": total["per_prompt"],
            "greedy_fraction": total["hits"] / n_positions if n_positions else math.nan,
            "n_positions": n_positions,
            "class_size": int(masks[name].sum()) if name in masks else 0,
            "generations": generations,
        }
        for name, total in totals.items()
    }
