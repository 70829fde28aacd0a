"""Model-health guard: refuse to keep training, or to record a month, once the model is visibly broken.

A model can be destroyed without any error being raised: on some CPUs a bitsandbytes bug in the CPU repacking of
4-bit weights turned a month-1 model with reference-text perplexity 21.8 into one with 105,554,497, while the first
training steps logged `grad_norm` 0, and the month was recorded and its card written. Two checks stop that:

- during training ([`TrainingHealthCallback`] plus a loss check in [`ContinualDPOTrainer.compute_loss`], options
  `health_check` / `health_check_steps` of [`ContinualDPOConfig`]): a non-finite training loss on any step, or a
  total gradient norm of the trained parameters that is 0 or non-finite on the first optimizer steps;
- after a campaign month's evaluation ([`check_evaluation`], options `health_check`, `max_perplexity_ratio` and
  `max_kl_to_base` of `CampaignConfig`): non-finite metrics, reference-text perplexity above `max_perplexity_ratio`
  times month 0's, or a KL to the base above `max_kl_to_base`.

Both raise [`ModelHealthError`], which names what was measured, the limit, and what to try.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

#: What to try when the guard refuses: the known causes first.
ADVICE = (
    "What to try: (1) with a 4-bit base on a CPU with AVX512-BF16, bitsandbytes repacks weights on eval forwards "
    "and training through them then gets no gradient: the library prevents it for the models it builds and trains, "
    "but a model evaluated by your own code before the trainer existed may carry packed weights; call "
    "`peft_selective.quantization.keep_4bit_layers_trainable(model)` first, or train without quantization; "
    "(2) a lower learning rate; (3) a smaller max_length or a check of the month's data (empty or identical "
    "chosen/rejected responses); (4) another quantization setting or compute dtype (fp16 overflows more easily than "
    "bf16 or fp32)."
)


class ModelHealthError(RuntimeError):
    """The model is broken (non-finite loss or metrics, vanished gradients, exploded perplexity or KL): training or
    recording it was refused. `measured` and `limits` hold the numbers the message names."""

    def __init__(
        self, message: str, measured: Optional[dict[str, Any]] = None, limits: Optional[dict[str, Any]] = None
    ) -> None:
        super().__init__(message)
        self.measured = dict(measured or {})
        self.limits = dict(limits or {})


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------- training
def check_loss(loss: float, step: int) -> None:
    """Raise [`ModelHealthError`] if the training loss of optimizer step `step` is NaN or infinite."""
    if not math.isfinite(loss):
        raise ModelHealthError(
            f"Training refused at step {step}: the training loss is {loss} (not finite), so the model's outputs are "
            f"no longer numbers and every further step would only spread the damage. {ADVICE} To train anyway, set "
            "`health_check=False` (`--health_check false` for a campaign month).",
            measured={"step": step, "loss": loss},
        )


def trainable_grad_norm(model: torch.nn.Module) -> tuple[float, int, int]:
    """`(total L2 norm of the gradients, trainable parameters, trainable parameters with a gradient)` over the
    parameters with `requires_grad` (in a campaign: this month's adapter)."""
    norms = []
    trainable = with_grad = 0
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        trainable += 1
        if parameter.grad is None:
            continue
        with_grad += 1
        norm = parameter.grad.detach().float().norm()
        norms.append(norm.to(norms[0].device) if norms else norm)
    if not norms:
        return 0.0, trainable, with_grad
    return torch.linalg.vector_norm(torch.stack(norms)).item(), trainable, with_grad


def check_grad_norm(norm: float, step: int, trainable: int, with_grad: int) -> None:
    """Raise [`ModelHealthError`] if the total gradient norm of the trained parameters is 0 or non-finite."""
    if norm != 0.0 and math.isfinite(norm):
        return
    what = "0: no gradient reaches any of them" if norm == 0.0 else f"{norm} (not finite)"
    raise ModelHealthError(
        f"Training refused at step {step}: the total gradient norm of the {trainable} trained parameter tensors "
        f"({with_grad} received a gradient) is {what}. The optimizer would change nothing, or destroy the weights. "
        f"{ADVICE} To train anyway, set `health_check=False` (`--health_check false` for a campaign month), or "
        "`health_check_steps=0` to skip the gradient check only.",
        measured={"step": step, "grad_norm": norm, "trainable_tensors": trainable, "tensors_with_grad": with_grad},
    )


class TrainingHealthCallback(TrainerCallback):
    """Checks the gradients of the trained parameters before each of the first `steps` optimizer steps (after
    clipping; the Trainer has unscaled them by then) and raises [`ModelHealthError`] when their total norm is 0 or
    non-finite.

    Args:
        steps (`int`): optimizer steps checked from the start of training (`0`: none). A run resumed past them is not
            checked again.
        allow_non_finite (`bool`): accept non-finite gradients (fp16 mixed precision: the loss scaler skips those
            steps on purpose); a zero norm is still refused.
    """

    def __init__(self, steps: int, allow_non_finite: bool = False) -> None:
        self.steps = steps
        self.allow_non_finite = allow_non_finite

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step >= self.steps:
            return
        norm, trainable, with_grad = trainable_grad_norm(model)
        if self.allow_non_finite and not math.isfinite(norm):
            return
        check_grad_norm(norm, state.global_step + 1, trainable, with_grad)


# ------------------------------------------------------------------------------------------------- evaluation
def _non_finite(evaluation: Mapping[str, Any]) -> list[str]:
    """Names of the measured numbers of an `evaluate_model` result that are NaN or infinite."""
    found = [
        f"general/{metric}={value}"
        for metric, value in evaluation.get("general", {}).items()
        if isinstance(value, (int, float)) and not _is_finite(value)
    ]
    for month, scores in evaluation.get("preference", {}).items():
        found += [  # every number of the month's ranking: accuracies and margins (a NaN margin: a broken model)
            f"preference/{month}/{key}={value}"
            for key, value in scores.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_finite(value)
        ]
    return found


def check_evaluation(
    month: str,
    evaluation: Mapping[str, Any],
    baseline: Optional[Mapping[str, Any]],
    max_perplexity_ratio: Optional[float],
    max_kl_to_base: Optional[float],
) -> dict[str, Any]:
    """Refuse a month whose evaluation shows a broken model; returns what was measured and the limits otherwise.

    Refused ([`ModelHealthError`]) when any measured number of `evaluation` (an `evaluate_model` result) is NaN or
    infinite; when its reference-text perplexity exceeds `max_perplexity_ratio` times that of `baseline` (month 0, the
    base; the check needs both measured, and a non-finite month-0 perplexity is refused too: the base itself is
    broken); or when its `kl_to_base` (mean KL to the base in nats per token, on generic prompts) exceeds
    `max_kl_to_base`. A limit set to `None` is not checked.
    """
    general = evaluation.get("general", {})
    base_general = (baseline or {}).get("general", {})
    limits = {"max_perplexity_ratio": max_perplexity_ratio, "max_kl_to_base": max_kl_to_base}
    measured: dict[str, Any] = {}
    problems: list[str] = []
    over_limit = False
    non_finite = _non_finite(evaluation)
    if non_finite:
        measured["non_finite"] = non_finite
        problems.append(f"non-finite metrics: {', '.join(non_finite)}")
    if "perplexity" in general and "perplexity" in base_general:
        ppl, base_ppl = general["perplexity"], base_general["perplexity"]
        measured.update(perplexity=ppl, month_0_perplexity=base_ppl)
        if not _is_finite(base_ppl) or base_ppl <= 0:
            problems.append(f"month 0 (the base model) has reference-text perplexity {base_ppl}: the base is broken")
        elif _is_finite(ppl):
            ratio = ppl / base_ppl
            measured["perplexity_ratio"] = ratio
            if max_perplexity_ratio is not None and ratio > max_perplexity_ratio:
                over_limit = True
                problems.append(
                    f"reference-text perplexity {ppl:.6g} is {ratio:.4g} x month 0's {base_ppl:.6g} "
                    f"(limit: max_perplexity_ratio={max_perplexity_ratio})"
                )
    if "kl_to_base" in general:
        kl = general["kl_to_base"]
        measured["kl_to_base"] = kl
        if max_kl_to_base is not None and _is_finite(kl) and kl > max_kl_to_base:
            over_limit = True
            problems.append(f"KL to the base {kl:.6g} nats/token (limit: max_kl_to_base={max_kl_to_base})")
    if problems:
        expected = (
            " If the change is expected (e.g. a deliberate shift of domain), rerun the month with a higher "
            "--max_perplexity_ratio / --max_kl_to_base (or --health_check false)."
            if over_limit
            else ""
        )
        raise ModelHealthError(
            f"Month {month!r} refused: its evaluation shows a broken model: {'; '.join(problems)}. {ADVICE}{expected}",
            measured=measured,
            limits=limits,
        )
    return {"measured": measured, "limits": limits}
