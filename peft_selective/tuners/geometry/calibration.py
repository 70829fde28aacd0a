"""Calibration of GeometryProjected adapters, the guarantee report, and its measurement on held-out data.

    model = get_peft_model(base, GeometryProjectedConfig(tolerance=0.05, norm_cap=1.0))
    report = calibrate(model, protected_texts, tokenizer)          # before training
    ... train ...
    report = measure_guarantees(model, heldout_protected_texts, tokenizer, report)
    print(report.to_markdown()); report.save(adapter_dir)

Next month: add a new adapter and calibrate it with `previous_adapter=` so the subspace protected last month is
kept (from what that adapter stored) and extended with this month's data.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..selective.layer import SelectiveLayer
from .config import GeometryProjectedConfig
from .statistics import collect_statistics, protected_positions
from .subspace import choose_subspace, combine_second_moments, covariance_upper_bound, decompose
from .variant import ProtectedStats, is_soft


logger = logging.getLogger(__name__)

REPORT_FILENAME = "geometry_report.json"

TextsOrBatches = Union[Sequence[str], Iterable[Mapping[str, torch.Tensor]]]
#: Protected data by source (`{"reference_text": texts, "bleed_region": batches, ...}`): each source weighs the same.
SourcesOfTexts = Mapping[str, TextsOrBatches]


@dataclass
class LayerGuarantee:
    """What GeometryProjected promises for one layer, and what was measured."""

    in_features: int
    protected_dim: int
    free_dim: int
    soft_projector: bool
    outlier_axes: int
    residual_eigenvalue: float
    output_energy: float
    bound: float
    measured: Optional[float] = None


@dataclass
class GuaranteeReport:
    """Per-layer bounds and measured relative changes on protected data, plus the whole-model KL.

    Per-layer bounds compound through the network, so the end-to-end KL on held-out protected prompts is measured
    too (`kl_to_base`, mean per-token KL(base ‖ adapted) in nats)."""

    adapter_name: str
    tolerance: float
    norm_cap: float
    calibration_tokens: int
    layers: dict[str, LayerGuarantee] = field(default_factory=dict)
    heldout_tokens: Optional[int] = None
    kl_to_base: Optional[float] = None
    #: how the protected tokens were weighed: `"inputs"` (each token alike, or its source's weight) or
    #: `"keep_loss_gradient"` (see [`calibrate`]); the bounds are on the output change weighed the same way
    weighting: str = "inputs"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuaranteeReport:
        layers = {k: LayerGuarantee(**v) for k, v in data.pop("layers").items()}
        return cls(layers=layers, **data)

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / REPORT_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> GuaranteeReport:
        return cls.from_dict(json.loads((Path(directory) / REPORT_FILENAME).read_text()))

    @property
    def max_bound(self) -> float:
        return max(g.bound for g in self.layers.values())

    def violations(self) -> dict[str, tuple[float, float]]:
        """Layers whose measured change exceeds the bound: {name: (measured, bound)}."""
        return {
            n: (g.measured, g.bound) for n, g in self.layers.items() if g.measured is not None and g.measured > g.bound
        }

    def to_markdown(self) -> str:
        lines = [
            f"GeometryProjected guarantees for adapter `{self.adapter_name}` (tolerance δ={self.tolerance}, "
            f"norm cap ρ={self.norm_cap}, {self.calibration_tokens} calibration tokens"
            + (", weighted by the keep loss's gradient)" if self.weighting == "keep_loss_gradient" else ")"),
            "",
            "| layer | in | protected dim | free dim | projector | bound | measured |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for name, g in self.layers.items():
            measured = "" if g.measured is None else f"{g.measured:.4f}"
            projector = "soft" if g.soft_projector else "hard"
            lines.append(
                f"| {name} | {g.in_features} | {g.protected_dim} | {g.free_dim} | {projector} | {g.bound:.4f} | "
                f"{measured} |"
            )
        if self.kl_to_base is not None:
            lines += [
                "",
                f"Whole-model KL(base ‖ adapted) on {self.heldout_tokens} held-out protected tokens: "
                f"{self.kl_to_base:.5f} nats/token",
            ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- data input
def to_batches(
    data: TextsOrBatches, tokenizer=None, batch_size: int = 8, max_length: int = 512
) -> list[dict[str, torch.Tensor]]:
    """Accept a list of texts (needs `tokenizer`) or an iterable of batches with `input_ids` (+ `attention_mask`)."""
    data = list(data)
    if not data:
        raise ValueError("No protected data given: pass a non-empty list of texts or of tokenized batches.")
    if isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("Protected data given as texts: pass the `tokenizer` too.")
        batches = []
        for start in range(0, len(data), batch_size):
            enc = tokenizer(
                data[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return batches
    if not isinstance(data[0], Mapping) or "input_ids" not in data[0]:
        raise TypeError("Protected data must be texts or dicts with `input_ids` (and optionally `attention_mask`).")
    return [dict(b) for b in data]


def weighted_sources(
    sources: SourcesOfTexts, tokenizer=None, batch_size: int = 8, max_length: int = 512
) -> tuple[list[dict[str, torch.Tensor]], dict[str, int]]:
    """The batches of every non-empty source, each batch with a `protected_weight` such that every source weighs the
    same in the protected moments, whatever its number of tokens (the mean weight per token stays 1): a few hundred
    answer tokens of the bleed region are not drowned by thousands of reference-text tokens. Returns the batches
    and the protected tokens per source."""
    per_source = {name: to_batches(data, tokenizer, batch_size, max_length) for name, data in sources.items() if data}
    if not per_source:
        raise ValueError(f"No protected data given: every source is empty ({sorted(sources)}).")
    tokens = {}
    for name, batches in per_source.items():
        tokens[name] = sum(_protected_token_count(batch) for batch in batches)
        if tokens[name] == 0:
            raise ValueError(f"The protected data source {name!r} has no protected token.")
    total = sum(tokens.values())
    weighted = []
    for name, batches in per_source.items():
        weight = total / (len(per_source) * tokens[name])
        weighted += [{**batch, "protected_weight": weight} for batch in batches]
    return weighted, tokens


def _protected_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    mask = protected_positions(batch)
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _geometry_layers(model: nn.Module, adapter_name: str) -> dict[str, SelectiveLayer]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SelectiveLayer) and adapter_name in module.rank
    }


def _adapter_config(model: nn.Module, adapter_name: Optional[str]) -> tuple[str, GeometryProjectedConfig]:
    configs = getattr(model, "peft_config", {})
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        if active is None and callable(getattr(model, "active_adapters", None)):
            active = model.active_adapters()  # a transformers model with adapters loaded (`model.load_adapter`)
        adapter_name = active[-1] if isinstance(active, list) else active
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(configs)}.")
    config = configs[adapter_name]
    if not isinstance(config, GeometryProjectedConfig):
        raise TypeError(f"Adapter {adapter_name!r} is a {type(config).__name__}, not a GeometryProjectedConfig.")
    return adapter_name, config


# ---------------------------------------------------------------------------------------------------- calibrate
def calibrate(
    model: nn.Module,
    protected_data: Union[TextsOrBatches, SourcesOfTexts],
    tokenizer=None,
    *,
    adapter_name: Optional[str] = None,
    previous_adapter: Optional[str] = None,
    new_data: Optional[TextsOrBatches] = None,
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = True,
) -> GuaranteeReport:
    """Choose and install the protected subspace of every layer of a GeometryProjected adapter.

    Runs `protected_data` through the model as it is (quantized base, other active adapters included), collects
    each targeted layer's input statistics, picks the protected subspace from the adapter's `tolerance` and
    `norm_cap`, and stores it in the layers (and so in the saved adapter).

    Args:
        model: a `PeftModel` (or model with injected layers) carrying the GeometryProjected adapter.
        protected_data: texts (with `tokenizer`) or tokenized batches of what must not change, or a mapping from
            source names to either, in which every source weighs the same (see [`weighted_sources`]). A batch may
            carry a `protected_mask` to protect only some positions, e.g. the answers after their prompts (see
            `peft_selective.continual.anchors.AnchorSet.calibration_batches`).
        adapter_name: the adapter to calibrate; default: the active one.
        previous_adapter: a calibrated GeometryProjected adapter (e.g. last month's) whose protected subspace must
            be kept: its stored subspace (as a conservative second-moment bound) is combined with this data's.
        new_data: the data you are about to train on; needed for `select_fraction` (modules ranked by the share of
            the new data's input energy outside their protected subspace).

    Returns:
        The [`GuaranteeReport`] with per-layer bounds (measure them after training with `measure_guarantees`).

    Raises:
        ValueError: too few protected tokens for a layer (rank-deficient statistics), or no layer with room.
    """
    adapter_name, config = _adapter_config(model, adapter_name)
    layers = _geometry_layers(model, adapter_name)
    if isinstance(protected_data, Mapping) and "input_ids" in protected_data:
        raise TypeError("Pass tokenized protected data as a list of batches, not one batch.")
    if isinstance(protected_data, Mapping):
        batches, _ = weighted_sources(protected_data, tokenizer, batch_size, max_length)
    else:
        batches = to_batches(protected_data, tokenizer, batch_size, max_length)
    report = collect_statistics(
        model,
        list(layers),
        batches,
        max_memory_mb=config.calibration_max_memory_mb,
        show_progress=show_progress,
        keep_loss_gradient=config.calibration_weighting == "keep_loss_gradient",
    )
    stats = report.statistics
    # Rank-deficient statistics make unobserved directions look "free": refuse rather than promise too much.
    starved = {
        n: (s.num_tokens, layers[n].in_features)
        for n, s in stats.items()
        if s.num_tokens < config.min_tokens_per_dim * layers[n].in_features
    }
    if starved:
        name, (tokens, dim) = next(iter(starved.items()))
        raise ValueError(
            f"Too little calibration data: {name} saw {tokens} protected tokens for {dim} input dimensions "
            f"(need >= min_tokens_per_dim x in_features = {config.min_tokens_per_dim * dim:.0f}); "
            f"{len(starved)} layer(s) affected. Add protected text or lower `min_tokens_per_dim`."
        )
    spectra: dict[str, Any] = {}
    guarantees: dict[str, LayerGuarantee] = {}
    subspaces = {}
    for name, layer in tqdm(layers.items(), desc="Choosing protected subspaces", disable=not show_progress):
        stat = stats[name]
        output_energy = stat.output_energy
        key = stat.input_key
        if previous_adapter is not None:
            prev = _previous_state(layer, previous_adapter, name)
            moment = combine_second_moments([(stat.covariance, 1.0), (prev["covariance"], 1.0)])
            output_energy = min(output_energy, prev["output_energy"])
            spectrum = decompose(moment, config.outlier_ratio)
        else:
            if key not in spectra:
                spectra[key] = decompose(stats[key].covariance, config.outlier_ratio)
            spectrum = spectra[key]
        subspace = choose_subspace(
            spectrum,
            output_energy,
            tolerance=config.tolerance,
            norm_cap=config.norm_cap,
            min_free_dim=config.min_free_dim,
        )
        subspaces[name] = (subspace, output_energy)
        guarantees[name] = LayerGuarantee(
            in_features=layer.in_features,
            protected_dim=subspace.dim,
            free_dim=subspace.free_dim,
            soft_projector=subspace.soft,
            outlier_axes=subspace.num_outliers,
            residual_eigenvalue=subspace.residual_eigenvalue,
            output_energy=output_energy,
            bound=subspace.bound(config.norm_cap, output_energy),
        )
    selected = _select_by_capacity(
        model, config, layers, subspaces, new_data, tokenizer, batch_size, max_length, show_progress
    )
    for name, layer in layers.items():
        if name not in selected:
            layer.delete_adapter(adapter_name)
            guarantees.pop(name)
            continue
        subspace, output_energy = subspaces[name]
        layer.set_protected_subspace(
            adapter_name, subspace, output_energy=output_energy, norm_cap=config.norm_cap, num_tokens=report.num_tokens
        )
    prefix = "base_model.model."  # module names as the tuner (and so the saved config) sees them
    if len(selected) < len(layers):
        # the saved config must name exactly the modules that carry the adapter, or reloading would recreate them
        config.target_modules = {n.removeprefix(prefix) for n in selected}
    # Recorded in the saved config (as LoRA's `rank_pattern`), so that injecting the adapter creates its protected
    # buffers in these shapes: transformers' loaders copy tensors in without the pre-hook that would resize them.
    config.protected_dims = {
        n.removeprefix(prefix): int(layers[n].selective_protected_basis[adapter_name].shape[1])
        for n in sorted(selected)
    }
    return GuaranteeReport(
        adapter_name=adapter_name,
        tolerance=config.tolerance,
        norm_cap=config.norm_cap,
        calibration_tokens=report.num_tokens,
        layers=guarantees,
        weighting=config.calibration_weighting,
    )


def _previous_state(layer: SelectiveLayer, previous_adapter: str, name: str) -> dict[str, Any]:
    if not layer.is_calibrated(previous_adapter):
        raise ValueError(
            f"{name} has no calibrated subspace for previous adapter {previous_adapter!r}: pass a calibrated "
            "GeometryProjected adapter that targets the same modules."
        )
    stats = ProtectedStats.from_tensor(layer.selective_protected_stats[previous_adapter])
    return {
        "covariance": covariance_upper_bound(
            layer.selective_protected_basis[previous_adapter].cpu(),
            layer.selective_protected_values[previous_adapter].cpu(),
            stats.residual_eigenvalue,
        ),
        "output_energy": stats.output_energy,
    }


def _select_by_capacity(model, config, layers, subspaces, new_data, tokenizer, batch_size, max_length, show_progress):
    """Keep the modules where the new data has the most energy outside the protected subspace."""
    if config.select_fraction is None or config.select_fraction >= 1:
        return set(layers)
    if new_data is None:
        raise ValueError(
            "`select_fraction` ranks modules by the new data's free energy: pass `new_data` to calibrate."
        )
    new_stats = collect_statistics(
        model,
        list(layers),
        to_batches(new_data, tokenizer, batch_size, max_length),
        max_memory_mb=config.calibration_max_memory_mb,
        show_progress=show_progress,
    ).statistics
    scores = {}
    for name, (subspace, _) in subspaces.items():
        c = new_stats[name].covariance.double()
        u, w = subspace.basis.double().to(c.device), subspace.weights.double().to(c.device)
        # energy the update could still reach: tr(P C P) with P = I - U diag(w) Uᵀ
        p = torch.eye(c.shape[0], dtype=c.dtype, device=c.device) - (u * w) @ u.T
        scores[name] = float(torch.trace(p @ c @ p) / torch.trace(c).clamp_min(1e-30))
    keep = max(1, math.ceil(config.select_fraction * len(scores)))
    ranked = sorted(scores, key=scores.get, reverse=True)
    logger.info(
        "Capacity selection keeps %d of %d modules; free-energy share %.3f..%.3f",
        keep,
        len(ranked),
        scores[ranked[keep - 1]],
        scores[ranked[0]],
    )
    return set(ranked[:keep])


# ------------------------------------------------------------------------------------------------------ measure
@torch.no_grad()
def measure_guarantees(
    model: nn.Module,
    heldout_data: TextsOrBatches,
    tokenizer=None,
    report: Optional[GuaranteeReport] = None,
    *,
    adapter_name: Optional[str] = None,
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = True,
) -> GuaranteeReport:
    """Measure, on held-out protected data, each layer's relative output change `sqrt(Σ‖ΔW x‖² / Σ‖W x‖²)` (inputs
    from the model without the adapter, as the bound assumes) and the whole-model KL(base ‖ adapted).
    Fills `measured` / `kl_to_base` of `report` (rebuilt from the layers if not given) and returns it."""
    adapter_name, config = _adapter_config(model, adapter_name)
    layers = {n: m for n, m in _geometry_layers(model, adapter_name).items() if m.is_calibrated(adapter_name)}
    if report is None:
        report = report_from_model(model, adapter_name)
    batches = to_batches(heldout_data, tokenizer, batch_size, max_length)
    sums = {n: [0.0, 0.0] for n in layers}
    mask_holder: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook(name):
        def forward_hook(module, args, output):
            x, mask = args[0], mask_holder["mask"]
            delta = module.delta_output(x, adapter_name)
            if mask is not None and delta.dim() == 3:
                delta, out = delta[mask], output[mask]
            else:
                out = output
            sums[name][0] += float(delta.float().pow(2).sum())
            sums[name][1] += float(out.float().pow(2).sum())

        return forward_hook

    was_training = model.training
    model.eval()
    kl_sum, tokens = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="Measuring guarantees", disable=not show_progress):
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            mask = protected_positions(batch)
            mask_holder["mask"] = mask.to(device).bool() if mask is not None else None
            handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
            try:
                with model.disable_adapter():
                    base_logits = model(**inputs).logits.float()
            finally:
                for h in handles:
                    h.remove()
            adapted_logits = model(**inputs).logits.float()
            kl = F.kl_div(
                adapted_logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            keep = mask_holder["mask"] if mask_holder["mask"] is not None else torch.ones_like(kl, dtype=torch.bool)
            kl_sum += float(kl[keep].sum())
            tokens += int(keep.sum())
    finally:
        model.train(was_training)
    for name, (delta_sq, out_sq) in sums.items():
        if name in report.layers:
            report.layers[name].measured = math.sqrt(delta_sq / max(out_sq, 1e-30))
    report.kl_to_base = kl_sum / max(tokens, 1)
    report.heldout_tokens = tokens
    return report


def report_from_model(model: nn.Module, adapter_name: Optional[str] = None) -> GuaranteeReport:
    """Rebuild the bounds of a calibrated adapter from what its layers store (e.g. after `from_pretrained`)."""
    adapter_name, config = _adapter_config(model, adapter_name)
    layers, calibration_tokens = {}, 0
    for name, layer in _geometry_layers(model, adapter_name).items():
        if not layer.is_calibrated(adapter_name):
            continue
        stats = ProtectedStats.from_tensor(layer.selective_protected_stats[adapter_name])
        calibration_tokens = max(calibration_tokens, stats.calibration_tokens)
        weights = layer.selective_protected_weights[adapter_name]
        dim = int(weights.sum().round())
        layers[name] = LayerGuarantee(
            in_features=layer.in_features,
            protected_dim=dim,
            free_dim=layer.in_features - dim,
            soft_projector=is_soft(weights),
            outlier_axes=stats.outlier_axes,
            residual_eigenvalue=stats.residual_eigenvalue,
            output_energy=stats.output_energy,
            bound=stats.bound(),
        )
    return GuaranteeReport(
        adapter_name,
        config.tolerance,
        config.norm_cap,
        calibration_tokens,
        layers=layers,
        weighting=config.calibration_weighting,
    )
