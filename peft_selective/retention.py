"""The retention dial: WiSE-FT-style interpolation of a month's adapter toward the model before it.

A month's adapter adds an update `Δ` to the model of month t−1. Scaling that update after training,
`θ_t(s) = θ_{t−1} + s·Δ`, interpolates linearly (in weight space) between the month t−1 model (`s = 0`) and the trained
month t model (`s = 1`). Weight interpolation toward the previous model gives the best alignment-vs-forgetting front
among the retention methods compared by Lin et al. (2024, "Mitigating the Alignment Tax of RLHF"), and our
protocol-2 benchmark (`benchmarks/forgetting.py`) traces learning vs forgetting over that same post-hoc scale.

```python
from peft_selective.retention import choose_scale, scale_adapter, scaled_adapter

# measure a curve on held-out rows: (scale, learning gain, forgetting)
curve = []
for s in (0.25, 0.5, 0.75, 1.0):
    with scaled_adapter(model, "2025-07", s):  # temporarily; the trained weights come back afterwards
        curve.append((s, my_learning_gain(model), my_forgetting(model)))
choice = choose_scale(curve, keep_learning_share=0.9)  # or forgetting_budget=0.05
record = scale_adapter(model, "2025-07", choice["scale"])  # baked into the adapter's weights
model.save_pretrained("out")  # any PEFT / transformers loader reads the scaled adapter; nothing else to carry
```

[`scale_adapter`] multiplies the update in place, in the adapter's own weights, so the scaled adapter merges exactly
(`merge_and_unload`), survives `save_pretrained` / `from_pretrained` and the Hub, and needs no new config field:

- peft-selective layers: the full-rank `selective_delta_weight`, or the low-rank `selective_delta_B` (`ΔW = s·B A`
  stays a product of the same shapes), and `selective_delta_bias`. A GeometryProjected adapter's norm cap
  (`‖ΔW‖_F ≤ cap`) is folded in first, so the scaled update is exactly `scale ×` the capped one; with `scale <= 1`
  the bound keeps holding; a `scale > 1` is clipped by the cap again (a warning says so).
- PEFT LoRA: `lora_B` (weight, and its bias with `lora_bias=True`) and `lora_embedding_B`. DoRA and the other LoRA
  variants (their magnitude or extra terms are not linear in `B`), AdaLoRA and the other PEFT methods are refused.

Adapters with `modules_to_save` / trainable tokens (full copies, not additive updates) and merged adapters are refused.
PEFT configs are dataclasses with fixed fields: the scale is *not* written to `adapter_config.json`; [`scale_adapter`]
returns a JSON-able record for the caller to keep (the `peft_selective` campaign stores it in `campaign.json` and the model
card).

[`choose_scale`] picks a scale from measured points, with one of two rules (documented on the function).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from .tuners.selective.config import SelectiveConfig
from .tuners.selective.layer import SelectiveLayer


__all__ = ["choose_scale", "layer_factor", "layer_index", "parse_layer_scales", "scale_adapter", "scaled_adapter"]

LayerScales = Union[Mapping[Any, float], Callable[[int], float]]

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
# Tolerance of the comparisons of `choose_scale` (learning gains and forgetting are means of per-item scores).
_TOLERANCE = 1e-12


def layer_index(module_name: str) -> Optional[int]:
    """The block index of a module name: its first dotted integer component (`model.layers.3.mlp.gate_proj` -> 3,
    `transformer.h.11.attn.c_attn` -> 11), `None` when it has none (e.g. `lm_head`)."""
    match = _LAYER_INDEX.search("." + module_name)
    return int(match.group(1)) if match else None


def _check_factor(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _parse_key(key: Any) -> tuple[int, float]:
    """A `layer_scales` key as an inclusive range `(low, high)`; `high` may be infinite ("10-")."""
    if isinstance(key, bool):
        raise ValueError(f"Invalid layer_scales key {key!r}.")
    if isinstance(key, int):
        low, high = key, key
    elif isinstance(key, range):
        if key.step != 1 or len(key) == 0:
            raise ValueError(f"A layer_scales range must be non-empty with step 1, got {key!r}.")
        low, high = key.start, key.stop - 1
    elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
        low, high = key
    elif isinstance(key, str) and key.strip().isdigit():
        low = high = int(key)
    elif isinstance(key, str) and (match := _RANGE.match(key)) and (match.group(1) or match.group(2)):
        low = int(match.group(1)) if match.group(1) else 0
        high = int(match.group(2)) if match.group(2) else math.inf
    else:
        raise ValueError(
            f"Invalid layer_scales key {key!r}: use a layer index (3 or '3'), an inclusive range ('0-9', '10-', "
            "(0, 9)) or a `range`."
        )
    if low < 0 or high < low:
        raise ValueError(f"Invalid layer_scales range {key!r}: it must be 0 <= first <= last.")
    return low, high


def parse_layer_scales(layer_scales: Union[str, Mapping[Any, float], None]) -> Optional[dict[str, float]]:
    """Per-block factors as the campaign stores them, `{"0-9": 0.5, "10-": 1.0}`, from a mapping, a JSON object, or
    the command-line form `"0-9:0.5,10-:1"` (blocks 0-9 at half the month's scale, 10 and up at the full scale).
    `None` or an empty string stays `None`. Raises `ValueError` on a bad key, factor or overlapping ranges."""
    if layer_scales is None or (isinstance(layer_scales, str) and not layer_scales.strip()):
        return None
    if isinstance(layer_scales, str):
        text = layer_scales.strip()
        if text.startswith("{"):
            try:
                layer_scales = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"layer_scales {text!r} is not a JSON object: {error}") from None
        else:
            mapping: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.rpartition(":")
                if not sep or not key.strip():
                    raise ValueError(
                        f"Invalid layer_scales entry {part!r} in {text!r}: write 'blocks:factor' pairs separated by "
                        "commas, e.g. '0-9:0.5,10-:1'."
                    )
                try:
                    mapping[key.strip()] = float(value)
                except ValueError:
                    raise ValueError(f"Invalid factor {value!r} in layer_scales entry {part!r}.") from None
            layer_scales = mapping
    if not isinstance(layer_scales, Mapping) or not layer_scales:
        raise ValueError(f"layer_scales must map block ranges to factors, got {layer_scales!r}.")
    _, described, _ = _layer_factor_fn(layer_scales)  # validates keys, factors and overlaps
    return described


def layer_factor(layer_scales: Union[str, LayerScales, None]) -> Callable[[str], float]:
    """`factor(name)`: what `scale_adapter(..., layer_scales=layer_scales)` multiplies the update of the module (or
    parameter) `name` by, on top of its scale: the factor of its block (`layer_index`), 1 for a block no key covers
    and for a name without a block index (e.g. `lm_head`). `layer_scales` in any form `scale_adapter` or
    [`parse_layer_scales`] takes ("0-9:0.5,10-:1", a mapping, a callable); for scaling weight differences directly."""
    if isinstance(layer_scales, str):
        layer_scales = parse_layer_scales(layer_scales)
    factor_of, _, _ = _layer_factor_fn(layer_scales)
    return lambda name: factor_of(layer_index(name))


def _layer_factor_fn(layer_scales: Optional[LayerScales]) -> tuple[Callable[[Optional[int]], float], Any, list]:
    """`(factor(index), JSON-able description, per-key ranges for the unused-key check)`."""
    if layer_scales is None:
        return (lambda index: 1.0), None, []
    if callable(layer_scales) and not isinstance(layer_scales, Mapping):

        def factor(index: Optional[int]) -> float:
            if index is None:
                return 1.0
            return _check_factor(layer_scales(index), f"layer_scales({index})")

        return factor, getattr(layer_scales, "__name__", "callable"), []
    if not isinstance(layer_scales, Mapping):
        raise TypeError(f"`layer_scales` must be a mapping or a callable, got {type(layer_scales).__name__}.")
    ranges = []
    for key, value in layer_scales.items():
        low, high = _parse_key(key)
        ranges.append((low, high, _check_factor(value, f"layer_scales[{key!r}]"), key))
    ordered = sorted(ranges, key=lambda r: r[0])
    for (_, high_a, _, key_a), (low_b, _, _, key_b) in zip(ordered, ordered[1:]):
        if low_b <= high_a:
            raise ValueError(f"layer_scales keys {key_a!r} and {key_b!r} overlap: every layer gets one factor.")

    def factor(index: Optional[int]) -> float:
        if index is None:
            return 1.0
        return next((value for low, high, value, _ in ranges if low <= index <= high), 1.0)

    return factor, {str(key): value for _, _, value, key in ranges}, ranges


def _adapter_config(model: nn.Module, adapter_name: str) -> Optional[Any]:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping):
        if adapter_name not in configs:
            raise ValueError(f"The model has no adapter {adapter_name!r}; it has {sorted(configs)}.")
        return configs[adapter_name]
    return None


def _check_config(config: Any, adapter_name: str) -> None:
    if config is None:
        return
    if not isinstance(config, (SelectiveConfig, LoraConfig)) or (
        isinstance(config, LoraConfig) and type(config).__name__ != "LoraConfig"
    ):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {type(config).__name__}: only the peft-selective methods and plain PEFT "
            "LoRA can be scaled (their update is linear in one factor)."
        )
    if isinstance(config, LoraConfig) and getattr(config, "use_dora", False):
        raise ValueError(
            f"Adapter {adapter_name!r} uses DoRA: its magnitude vector renormalises the update, so scaling `lora_B` "
            "does not scale the change of the weights. Scale a plain LoRA adapter instead."
        )
    extra = [name for name in ("modules_to_save", "trainable_token_indices") if getattr(config, name, None)]
    if extra:
        raise ValueError(
            f"Adapter {adapter_name!r} has {extra}: full trained copies of modules (or tokens) are not an additive "
            "update and cannot be scaled."
        )


def _targets(
    model: nn.Module, adapter_name: str
) -> list[tuple[str, nn.Module, list[nn.Parameter], list[nn.Parameter]]]:
    """`(module name, layer, parameters scaled with the cap folded in, parameters scaled plainly)` of every layer
    holding `adapter_name`; refuses merged adapters and LoRA variants."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SelectiveLayer) and adapter_name in module.rank:
            if adapter_name in module.merged_adapters:
                raise ValueError(f"Adapter {adapter_name!r} is merged into {name}: unmerge it before scaling.")
            found.append((name, module, [], []))
        elif isinstance(module, LoraLayer) and (
            adapter_name in module.lora_B or adapter_name in getattr(module, "lora_embedding_B", {})
        ):
            if type(module).__module__.split(".")[2:3] != ["lora"]:  # AdaLoRA etc. subclass LoraLayer
                raise ValueError(f"{name} is a {type(module).__name__} layer: only plain LoRA layers can be scaled.")
            variant = getattr(module, "lora_variant", {}).get(adapter_name)
            if variant is not None or getattr(module, "use_dora", {}).get(adapter_name):
                kind = type(variant).__name__ if variant is not None else "DoRA"
                raise ValueError(
                    f"Adapter {adapter_name!r} is a LoRA variant ({kind}) in {name}: its update is not linear in "
                    "`lora_B`, so it cannot be scaled. Only plain LoRA adapters can."
                )
            if adapter_name in module.merged_adapters:
                raise ValueError(f"Adapter {adapter_name!r} is merged into {name}: unmerge it before scaling.")
            plain: list[nn.Parameter] = []
            if adapter_name in module.lora_B:
                factor = module.lora_B[adapter_name]
                plain += [factor] if isinstance(factor, nn.Parameter) else list(factor.parameters())
            embedding = getattr(module, "lora_embedding_B", {})
            if adapter_name in embedding:
                plain.append(embedding[adapter_name])
            found.append((name, module, [], plain))
    if not found:
        raise ValueError(f"No layer of the model holds adapter {adapter_name!r}: nothing to scale.")
    return found


@torch.no_grad()
def _scale_selective(layer: SelectiveLayer, adapter: str, factor: float, name: str) -> None:
    """Multiply the update of a selective layer by `factor`, the norm cap folded in first (see the module docstring)."""
    layer._sync_protected_mirrors(adapter)
    cap = 1.0
    if layer.norm_cap.get(adapter) is not None:
        soft = layer.soft_projection.get(adapter, False)
        if layer.rank[adapter] is None:
            raw = layer.selective_delta_weight[adapter].float()
            capped = raw if soft else layer._project(adapter, raw)
        else:
            A = layer.selective_delta_A[adapter].float()
            A = A if soft else layer._project(adapter, A)
            capped = layer.scaling[adapter] * (layer.selective_delta_B[adapter].float() @ A)
        cap = float(layer._cap_factor(adapter, capped.pow(2).sum()))
        if factor > 1:
            warnings.warn(
                f"Scaling the GeometryProjected adapter {adapter!r} in {name} by {factor} > 1: its norm cap "
                f"({layer.norm_cap[adapter]:.4g}) clips the scaled update again, so it is not exactly {factor}x.",
                UserWarning,
                stacklevel=3,
            )
    target = layer.selective_delta_weight[adapter] if layer.rank[adapter] is None else layer.selective_delta_B[adapter]
    target.mul_(factor * cap)
    if adapter in layer.selective_delta_bias:
        layer.selective_delta_bias[adapter].mul_(factor)


def scale_adapter(
    model: nn.Module, adapter_name: str, scale: float, layer_scales: Optional[LayerScales] = None
) -> dict[str, Any]:
    """Multiply the update of adapter `adapter_name` by `scale`, in place, baked into the adapter's weights.

    The model then computes `base + earlier adapters + scale·Δ` in every targeted layer: for a linear layer its output
    is exactly `y_base + scale·(y_adapted − y_base)`; merging (`merge_and_unload`) merges the scaled update, and
    saving writes it (see the module docstring for what is scaled per method, and what is refused).

    Args:
        model (`nn.Module`): a `PeftModel` (or any model with the adapter injected).
        adapter_name (`str`): the adapter to scale; the others are left alone.
        scale (`float`): the factor, >= 0 (0 removes the update, 1 leaves it; > 1 extrapolates).
        layer_scales (*optional*): per-block factors, multiplied with `scale`: a mapping from a block index (`3`,
            `"3"`), an inclusive range (`"0-9"`, `"10-"`, `(0, 9)`, `range(0, 10)`) to a factor, or a callable
            `layer_index -> factor`. E.g. `scale_adapter(model, "m", 1.0, {"0-9": 0.5})` halves the update of blocks
            0..9 and keeps the others: lower blocks stay closer to the previous model. A module's block index is the
            first dotted integer of its name (`model.layers.3.mlp.gate_proj` -> 3, see [`layer_index`]); modules
            without one get the factor 1. Ranges must not overlap; a key that matches no adapted block is refused (a
            typo would otherwise change nothing silently).

    Returns:
        `dict`: a JSON-able record to store with the adapter (its config has no field for it): `adapter`, `scale`,
        `layer_scales` (the mapping with string keys, the callable's name, or `None`), `modules` (how many layers were
        scaled) and `layer_factors` (`{block index: effective factor}`, only with `layer_scales`).

    Raises:
        `ValueError`: an unknown adapter, a negative or non-finite scale, a method or LoRA variant whose update is not
        linear in one factor (DoRA, AdaLoRA, LoHa, ...), `modules_to_save`, a merged adapter, a bad `layer_scales`.
    """
    scale = _check_factor(scale, "`scale`")
    config = _adapter_config(model, adapter_name)
    _check_config(config, adapter_name)
    factor_of, described, ranges = _layer_factor_fn(layer_scales)
    targets = _targets(model, adapter_name)
    indices = {name: layer_index(name) for name, *_ in targets}
    for low, high, _, key in ranges:
        if not any(index is not None and low <= index <= high for index in indices.values()):
            present = sorted({i for i in indices.values() if i is not None})
            raise ValueError(
                f"layer_scales key {key!r} matches no block holding adapter {adapter_name!r} (blocks: {present})."
            )
    factors: dict[str, float] = {}
    with torch.no_grad():
        for name, module, _, plain in targets:
            index = indices[name]
            factor = scale * factor_of(index)
            if index is not None:
                factors[str(index)] = factor
            if isinstance(module, SelectiveLayer):
                _scale_selective(module, adapter_name, factor, name)
            else:
                for param in plain:
                    param.mul_(factor)
    return {
        "adapter": adapter_name,
        "scale": scale,
        "layer_scales": described,
        "modules": len(targets),
        **({"layer_factors": dict(sorted(factors.items(), key=lambda kv: int(kv[0])))} if layer_scales else {}),
    }


def _adapter_tensors(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    tensors = []
    for _, module, _, plain in _targets(model, adapter_name):
        if isinstance(module, SelectiveLayer):
            for params in (module.selective_delta_weight, module.selective_delta_B, module.selective_delta_bias):
                if adapter_name in params:
                    tensors.append(params[adapter_name])
        else:
            tensors += plain
    return tensors


@contextlib.contextmanager
def scaled_adapter(
    model: nn.Module, adapter_name: str, scale: float, layer_scales: Optional[LayerScales] = None
) -> Iterator[dict[str, Any]]:
    """[`scale_adapter`] for the duration of a `with` block, then the adapter's trained weights back, bit for bit
    (they are copied before scaling). Yields the record."""
    tensors = _adapter_tensors(model, adapter_name)
    saved = [tensor.detach().clone() for tensor in tensors]
    try:
        yield scale_adapter(model, adapter_name, scale, layer_scales)
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)


# ------------------------------------------------------------------------------------------------- choosing a scale
def _points(curve: Sequence[Any]) -> list[tuple[float, float, float]]:
    points = []
    for point in curve:
        if isinstance(point, Mapping):
            missing = [k for k in ("scale", "learning_gain", "forgetting") if k not in point]
            if missing:
                raise ValueError(f"A curve point lacks {missing}: {dict(point)!r}.")
            values = (point["scale"], point["learning_gain"], point["forgetting"])
        else:
            values = tuple(point)
            if len(values) != 3:
                raise ValueError(f"A curve point must be (scale, learning_gain, forgetting), got {point!r}.")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"A curve point must hold finite numbers, got {point!r}.")
        points.append(tuple(float(v) for v in values))
    if not points:
        raise ValueError("The curve is empty: measure at least one scale.")
    scales = [p[0] for p in points]
    if len(set(scales)) != len(scales):
        raise ValueError(f"The curve measures a scale twice: {scales}.")
    return points


def _closest_to_one(point: tuple[float, float, float]) -> tuple[float, float]:
    return (abs(point[0] - 1.0), -point[0])


def _choice(point: tuple[float, float, float], rule: str, met: bool, **extra: float) -> dict[str, Any]:
    return {"scale": point[0], "learning_gain": point[1], "forgetting": point[2], "rule": rule, "met": met, **extra}


def choose_scale(
    curve: Sequence[Any], keep_learning_share: Optional[float] = None, forgetting_budget: Optional[float] = None
) -> dict[str, Any]:
    """Choose a retention scale from measured points, with one of two rules.

    Args:
        curve: points `(scale, learning_gain, forgetting)` (tuples, or dicts with those keys), e.g. the behavioural
            gain on held-out rows against the model before the month, and the KL to that model on general prompts.
            Nothing is assumed about their shape: forgetting need not grow with the scale.
        keep_learning_share (`float` in [0, 1]): **keep rule**, the least forgetting among the points that keep at
            least this share of the full update's learning, `learning_gain >= keep_learning_share * gain(1)`; the
            curve must measure scale 1. When the full update learned nothing (`gain(1) <= 0`) the threshold is
            `gain(1)` itself: any scale that does no worse qualifies. Ties in forgetting: the larger learning gain,
            then the scale closest to 1 (the larger one on an equal distance). Scale 1 always qualifies, so the rule is
            always met.
        forgetting_budget (`float` >= 0): **budget rule**, the most learning among the points whose forgetting is at
            most the budget. Ties in learning: the smaller forgetting, then the scale closest to 1. When no point fits
            the budget, the point with the least forgetting is returned with `met=False` (a caller may refuse it).

        Give exactly one of the two.

    Returns:
        `dict`: `scale`, `learning_gain` and `forgetting` of the chosen point, `rule` (a sentence), `met` (`bool`),
        and `threshold` (keep rule) or `budget` (budget rule).

    Raises:
        `ValueError`: no rule or both, an empty curve or a bad point, a scale measured twice, a share outside [0, 1],
        a negative budget, the keep rule without scale 1 in the curve.
    """
    points = _points(curve)
    if (keep_learning_share is None) == (forgetting_budget is None):
        raise ValueError("Give exactly one rule: `keep_learning_share` or `forgetting_budget`.")
    if forgetting_budget is not None:
        budget = float(forgetting_budget)
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(f"`forgetting_budget` must be a finite number >= 0, got {forgetting_budget!r}.")
        within = [p for p in points if p[2] <= budget + _TOLERANCE]
        if within:
            best = min(within, key=lambda p: (-p[1], p[2], *_closest_to_one(p)))
            rule = f"most learning with forgetting <= {budget:g}"
            met = True
        else:
            best = min(points, key=lambda p: (p[2], -p[1], *_closest_to_one(p)))
            rule = f"no scale has forgetting <= {budget:g}: the least forgetting"
            met = False
        return _choice(best, rule, met, budget=budget)
    share = float(keep_learning_share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"`keep_learning_share` must be in [0, 1], got {keep_learning_share!r}.")
    full = next((p for p in points if p[0] == 1.0), None)
    if full is None:
        raise ValueError(
            f"The keep rule compares with the full update: the curve must measure scale 1 (it has {[p[0] for p in points]})."
        )
    threshold = share * full[1] if full[1] > 0 else full[1]
    eligible = [p for p in points if p[1] >= threshold - _TOLERANCE]
    best = min(eligible, key=lambda p: (p[2], -p[1], *_closest_to_one(p)))
    rule = f"least forgetting keeping >= {share:g} of the learning at scale 1"
    if full[1] <= 0:
        rule += " (which learned nothing: no worse than scale 1)"
    return _choice(best, rule, True, threshold=threshold)
