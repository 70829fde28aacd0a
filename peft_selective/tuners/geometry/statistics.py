"""Input statistics of linear layers on protected data, collected with forward hooks.

For each layer we need the uncentred second moment `C = E[x xᵀ]` of its input and the output energy `E‖y‖²`. The
statistics are gathered on the model *as served*: quantized layers, already-active adapters and all, since the hooks
only look at what flows in and out of each layer (4-bit weights are never dequantized). Padding is masked out. Layers
that read the same input tensor (q/k/v; gate/up) share one `C`. Accumulation is fp32 and chunked, and the memory
held by the `C` matrices is bounded by running several passes over the data when needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)


@dataclass
class LayerStatistics:
    """Sums over the protected tokens seen by one layer.

    Attributes:
        input_key: name of the layer whose input these sums belong to (layers sharing an input share the key).
        xxt_sum: `Σ x xᵀ` over tokens, fp32, `(in, in)`; shared object between layers with the same input.
        output_sq_sum: `Σ ‖y‖²` over tokens.
        num_tokens: number of protected tokens (not padding; only the `protected_mask` positions where a batch has one).
        weight_sum: `Σ w` over those tokens, where a batch's `protected_weight` `w` (default 1) scaled its tokens'
            terms in both sums; the moments are the weighted means. `None`: every weight was 1 (`num_tokens`).
    """

    input_key: str
    xxt_sum: torch.Tensor
    output_sq_sum: float = 0.0
    num_tokens: int = 0
    weight_sum: Optional[float] = None

    @property
    def _total_weight(self) -> float:
        return self.weight_sum if self.weight_sum is not None else max(self.num_tokens, 1)

    @property
    def covariance(self) -> torch.Tensor:
        return self.xxt_sum / self._total_weight

    @property
    def output_energy(self) -> float:
        return self.output_sq_sum / self._total_weight


@dataclass
class StatisticsReport:
    statistics: dict[str, LayerStatistics]
    num_tokens: int
    passes: int
    peak_statistics_mb: float
    shared_inputs: dict[str, list[str]] = field(default_factory=dict)


def _tokens_2d(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, d) -> (non-padding tokens, d); anything else is flattened to (-1, d)."""
    if mask is not None and t.dim() == 3 and t.shape[:2] == mask.shape:
        return t[mask]
    return t.reshape(-1, t.shape[-1])


class _Collector:
    def __init__(self, names: list[str], chunk_tokens: int, keep_loss_gradient: bool = False):
        self.names = names
        self.chunk_tokens = chunk_tokens
        self.keep_loss_gradient = keep_loss_gradient
        self.mask: torch.Tensor | None = None
        self.weight = 1.0
        self.stats: dict[str, LayerStatistics] = {}
        # Layers that share an input (q/k/v, gate/up) are called one after the other on the very same tensor
        # object; holding a reference to the last input (not its address, which the allocator may reuse) tells.
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None

    def new_batch(self, mask: torch.Tensor | None, weight: float = 1.0) -> None:
        self.mask = mask.bool() if mask is not None else None
        self.weight = weight
        self._last_input, self._last_owner = None, None

    def hook(self, name: str):
        def forward_hook(module: nn.Module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            # with gradient weights every layer has its own Σ w x xᵀ: q, k and v read one input but get other weights
            owner = self._last_owner if x is self._last_input and not self.keep_loss_gradient else None
            xs = _tokens_2d(x.detach(), self.mask)
            ys = _tokens_2d(output.detach(), self.mask)
            if name not in self.stats:
                if owner is not None and owner in self.stats:
                    xxt = self.stats[owner].xxt_sum
                    key = self.stats[owner].input_key
                else:
                    xxt = torch.zeros(xs.shape[-1], xs.shape[-1], dtype=torch.float32, device=xs.device)
                    key = name
                self.stats[name] = LayerStatistics(input_key=key, xxt_sum=xxt)
            stat = self.stats[name]
            if x is not self._last_input:
                self._last_input, self._last_owner = x, name
            if not self.keep_loss_gradient:
                self._accumulate(stat, name, xs, ys, self.weight)
                return
            mask, weight = self.mask, self.weight

            def on_gradient(grad: torch.Tensor) -> None:
                # how much the keep loss depends on this layer's output at each protected token, mean 1 per batch
                sensitivity = _tokens_2d(grad.detach(), mask).float().pow(2).sum(-1)
                if float(sensitivity.sum()) > 0:
                    self._accumulate(stat, name, xs, ys, weight * sensitivity / sensitivity.mean())

            output.register_hook(on_gradient)

        return forward_hook

    def _accumulate(
        self, stat: LayerStatistics, name: str, xs: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor | float
    ) -> None:
        """Add `Σ w x xᵀ` (the owner of a shared input only), `Σ w ‖y‖²`, the tokens and `Σ w`; `weights`: one per
        token, or one number for all (no scaled copy of the inputs then)."""
        per_token = isinstance(weights, torch.Tensor)
        if stat.input_key == name:  # the owner accumulates Σ x xᵀ; sharers only count
            for start in range(0, xs.shape[0], self.chunk_tokens):
                chunk = xs[start : start + self.chunk_tokens].float()
                if per_token:
                    stat.xxt_sum.addmm_((chunk * weights[start : start + self.chunk_tokens, None]).T, chunk)
                else:
                    stat.xxt_sum.addmm_(chunk.T, chunk, alpha=weights)
        energy = ys.float().pow(2).sum(-1)
        stat.output_sq_sum += float((energy * weights).sum())
        stat.num_tokens += xs.shape[0]
        total = float(weights.sum()) if per_token else weights * xs.shape[0]
        stat.weight_sum = (stat.weight_sum or 0.0) + total


def _keep_loss_backward(model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
    """Forward `inputs` and back-propagate the negative log-likelihood of the next token at every protected position
    (to the input embeddings only: no parameter's `.grad` is touched), so the layers' output hooks see `∂L/∂y`."""
    embeddings: list[torch.Tensor] = []

    def track(module, args, output):
        output = output.detach().requires_grad_(True)  # gradients flow from the first layer on, frozen weights or not
        embeddings.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(track)
    try:
        with torch.enable_grad():
            logits = model(**inputs).logits[:, :-1].float()
            targets = inputs["input_ids"][:, 1:]
            keep = (mask[:, :-1] if mask is not None else torch.ones_like(targets)).bool()
            if "attention_mask" in inputs:
                keep &= inputs["attention_mask"][:, 1:].bool()
            if not keep.any():
                return
            loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            torch.autograd.grad(loss, embeddings)
    finally:
        handle.remove()


def protected_positions(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The positions of a batch whose layer inputs are protected: its `protected_mask`, else its `attention_mask`
    (every real token), else `None` (all positions)."""
    mask = batch.get("protected_mask")
    return mask if mask is not None else batch.get("attention_mask")


def _group_by_budget(model: nn.Module, names: list[str], max_memory_mb: float | None) -> list[list[str]]:
    """Split layers into passes so that the `(in, in)` fp32 sums of one pass fit the budget (no sharing assumed)."""
    if not max_memory_mb:
        return [names]
    groups, current, current_mb = [], [], 0.0
    for name in names:
        module = model.get_submodule(name)
        in_features = _in_features(module)
        mb = in_features * in_features * 4 / 2**20
        if mb > max_memory_mb:
            raise ValueError(
                f"The input statistics of {name} alone need {mb:.0f} MiB, more than max_memory_mb={max_memory_mb}. "
                "Raise the budget."
            )
        if current and current_mb + mb > max_memory_mb:
            groups.append(current)
            current, current_mb = [], 0.0
        current.append(name)
        current_mb += mb
    if current:
        groups.append(current)
    return groups


def _in_features(module: nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if hasattr(base, "in_features"):
        return base.in_features
    if type(base).__name__ == "Conv1D":
        return base.weight.shape[0]
    raise TypeError(f"Cannot read in_features of {type(base).__name__}")


def collect_statistics(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    max_memory_mb: float | None = 2048,
    chunk_tokens: int = 4096,
    show_progress: bool = True,
    keep_loss_gradient: bool = False,
) -> StatisticsReport:
    """Run `batches` (dicts with `input_ids` and optionally `attention_mask`) through `model` and collect per-layer
    input second moments and output energies for the modules named in `layer_names`. A batch may also carry a
    `protected_mask` (same shape: only those positions are protected, e.g. the answer tokens after a prompt) and a
    `protected_weight` (a number: its tokens count that many times in the moments, e.g. to weigh sources equally).

    Args:
        max_memory_mb: bound on the memory of the accumulated `Σ x xᵀ` matrices. When the layers need more, the data
            is run through the model in several passes, each collecting a group of layers. `None`: one pass.
        chunk_tokens: tokens per fp32 matmul chunk, bounding the temporary memory of a hook.
        keep_loss_gradient: weigh each protected token by how much the keep loss depends on the layer's output
            there, `‖∂L/∂y_t‖²` (normalized to mean 1 per batch), where `L` is the model's negative log-likelihood of
            the protected positions' next tokens (the answers it gives now). The protected subspace then follows the
            directions of the keep loss's gradient `Σ_t (∂L/∂y_t) x_tᵀ`, rather than every direction the inputs
            take: an update there is what would move the kept answers first. Costs a backward pass per batch.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("No calibration data: pass at least one batch of protected text.")
    groups = _group_by_budget(model, layer_names, max_memory_mb)
    was_training = model.training
    model.eval()
    stats: dict[str, LayerStatistics] = {}
    peak_mb = 0.0
    total_tokens = 0
    try:
        for pass_idx, group in enumerate(groups):
            collector = _Collector(group, chunk_tokens, keep_loss_gradient)
            handles = [model.get_submodule(n).register_forward_hook(collector.hook(n)) for n in group]
            try:
                desc = "Calibrating protected subspace" + (
                    f" (pass {pass_idx + 1}/{len(groups)})" if len(groups) > 1 else ""
                )
                for batch in tqdm(batches, desc=desc, disable=not show_progress):
                    mask = protected_positions(batch)
                    collector.new_batch(mask, float(batch.get("protected_weight", 1.0)))
                    device = next(model.parameters()).device
                    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                    if keep_loss_gradient:
                        _keep_loss_backward(model, inputs, mask.to(device) if mask is not None else None)
                    else:
                        with torch.no_grad():
                            model(**inputs)
                    if pass_idx == 0:
                        total_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            finally:
                for handle in handles:
                    handle.remove()
            owners = {id(s.xxt_sum): s.xxt_sum for s in collector.stats.values()}
            peak_mb = max(peak_mb, sum(t.numel() * 4 for t in owners.values()) / 2**20)
            stats.update(collector.stats)
    finally:
        model.train(was_training)
    missing = [n for n in layer_names if n not in stats]
    if missing:
        raise RuntimeError(f"These layers were never called during calibration: {missing[:5]}...")
    shared: dict[str, list[str]] = {}
    for name, stat in stats.items():
        shared.setdefault(stat.input_key, []).append(name)
    logger.info(
        "Collected input statistics for %d layers (%d distinct inputs) on %d tokens in %d pass(es), %.0f MiB.",
        len(stats),
        len(shared),
        total_tokens,
        len(groups),
        peak_mb,
    )
    return StatisticsReport(
        statistics=stats,
        num_tokens=total_tokens,
        passes=len(groups),
        peak_statistics_mb=peak_mb,
        shared_inputs={k: v for k, v in shared.items() if len(v) > 1},
    )
