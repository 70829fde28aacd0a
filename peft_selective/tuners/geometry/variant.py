"""GeometryProjected as a variant of the shared selective layer: projection, norm cap and protected buffers.

A GeometryProjected adapter is a selective adapter (`..selective.layer.SelectiveLayer`) whose update is applied
through [`ProjectedVariant`], as PEFT applies DoRA to a LoRA layer through a `LoraVariant`:

    ΔW = ΔW' (I - U diag(w) Uᵀ),   rescaled so that ‖ΔW‖_F ≤ ρ   (‖ΔW'‖_F ≤ ρ for a soft projector)

with the protected subspace `U`, removal weights `w` and cap `ρ` chosen by calibration (`calibration.calibrate`,
`subspace.choose_subspace`). Projecting the parametrisation (not the gradients) keeps the constraint exact under any
optimizer. The variant's tensors are the layer's persistent buffers `selective_protected_{basis,weights,values,stats}`
(so the saved keys are the layer's); `selective_protected_stats` is a [`ProtectedStats`] record, saved as a 5-vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from ..selective.layer import SelectiveVariant
from .subspace import relative_output_bound


if TYPE_CHECKING:
    from ..selective.layer import SelectiveLayer
    from .config import GeometryProjectedConfig


@dataclass(frozen=True)
class ProtectedStats:
    """What calibration recorded for one layer, saved as the adapter's `selective_protected_stats` tensor.

    Attributes:
        residual_eigenvalue: `λ_bound`, the worst-case protected output energy per unit `‖ΔW‖_F²`.
        output_energy: `E‖y‖²` of the layer on the protected data.
        calibration_tokens: protected tokens calibration saw (0: not calibrated, the placeholder's value).
        norm_cap: `ρ`, the cap on `‖ΔW‖_F` the layer enforces.
        outlier_axes: massive-activation axes protected before the eigendecomposition.
    """

    residual_eigenvalue: float
    output_energy: float
    calibration_tokens: int
    norm_cap: float
    outlier_axes: int

    #: Length of the saved tensor: the fields above, in this order, as fp32 (the layout adapters are saved with).
    SIZE: ClassVar[int] = 5

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [
                float(self.residual_eigenvalue),
                float(self.output_energy),
                float(self.calibration_tokens),
                float(self.norm_cap),
                float(self.outlier_axes),
            ]
        )

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> ProtectedStats:
        values = tensor.detach().reshape(-1).tolist()
        if len(values) != cls.SIZE:
            raise ValueError(
                f"selective_protected_stats holds {cls.SIZE} values, got a tensor of shape {tensor.shape}."
            )
        residual, energy, tokens, cap, outliers = values
        return cls(residual, energy, int(tokens), cap, int(outliers))

    @property
    def calibrated(self) -> bool:
        return self.calibration_tokens > 0

    def bound(self) -> float:
        """The layer's bound on the relative output change on protected data (`subspace.relative_output_bound`)."""
        return relative_output_bound(self.residual_eigenvalue, self.norm_cap, self.output_energy)


def is_soft(weights: torch.Tensor) -> bool:
    """Whether stored removal weights `w` describe a soft projector (some direction only partly removed)."""
    return bool((weights < 1).any())


class ProjectedVariant(SelectiveVariant):
    """The protected-subspace behaviour of a GeometryProjected adapter on a selective layer (one instance per adapter
    and layer). The layer keeps the buffers and the Python-side mirrors `norm_cap[adapter]` (None until calibrated)
    and `soft_projection[adapter]`, which the forward pass reads without a device sync."""

    name: ClassVar[str] = "projected"

    def __init__(self) -> None:
        # The mirrors may lag the buffers: created as placeholders, then possibly filled by a loader that copies
        # tensors in without `load_state_dict` (transformers' `load_adapter` / `from_pretrained(adapter_dir)`), so
        # neither calibration nor the pre-hook set them. Read once from the buffers, see `prepare`.
        self.pending = False

    # ------------------------------------------------------------------------------------------------- state
    def init(
        self,
        module: SelectiveLayer,
        adapter: str,
        config: GeometryProjectedConfig,
        module_name: Optional[str] = None,
    ) -> None:
        """Zero placeholders (a no-op projection, "not calibrated" stats), so the keys exist when a calibrated
        adapter is loaded: in the calibrated shapes when the config records them (`protected_dims`), else empty and
        sized on load by `load_pre_hook`."""
        dim = config.protected_dim(module_name) if module_name is not None else 0
        module.requires_calibration[adapter] = True
        self._store(
            module,
            adapter,
            torch.zeros(module.in_features, dim),
            torch.zeros(dim),
            torch.zeros(dim),
            torch.zeros(ProtectedStats.SIZE),
        )
        self.pending = True

    def install(
        self, module: SelectiveLayer, adapter: str, subspace, *, output_energy: float, norm_cap: float, num_tokens: int
    ) -> None:
        """Install a calibrated protected subspace (`subspace.ProtectedSubspace`)."""
        stats = ProtectedStats(
            subspace.residual_eigenvalue, output_energy, num_tokens, norm_cap, subspace.num_outliers
        )
        self._store(module, adapter, subspace.basis, subspace.weights, subspace.basis_values, stats.to_tensor())
        module.norm_cap[adapter] = norm_cap
        module.soft_projection[adapter] = bool(subspace.soft)
        module.requires_calibration[adapter] = True
        self.pending = False

    @staticmethod
    def _store(module: SelectiveLayer, adapter: str, basis, weights, values, stats) -> None:
        device = _adapter_device(module, adapter)
        for name, tensor in zip(module.protected_buffer_names, (basis, weights, values, stats)):
            # fp32 whatever the base dtype: the projection is what the guarantee rests on
            getattr(module, name)[adapter] = tensor.detach().to(device=device, dtype=torch.float32)

    @staticmethod
    def stats(module: SelectiveLayer, adapter: str) -> ProtectedStats:
        return ProtectedStats.from_tensor(module.selective_protected_stats[adapter])

    def prepare(self, module: SelectiveLayer, adapter: str) -> None:
        """Set `norm_cap` / `soft_projection` from the buffers, once after the adapter was created.

        Calibration and the load pre-hook set the mirrors themselves; transformers' adapter loaders copy the
        checkpoint into the buffers without `load_state_dict`, so a freshly created adapter is read back here, on its
        first use (forward, merge, `is_calibrated`), after any such load. One device read per adapter and layer, then
        cached: an adapter still uncalibrated then stays so until calibrated or loaded through `load_state_dict`."""
        if not self.pending:
            return
        if adapter not in module.selective_protected_stats:
            self.pending = False
            return
        tensor = module.selective_protected_stats[adapter]
        if tensor.is_meta:  # not materialized yet (meta-device initialization): read it later
            return
        self.pending = False
        stats = ProtectedStats.from_tensor(tensor)
        if stats.calibrated:
            module.norm_cap[adapter] = float(stats.norm_cap)
            module.soft_projection[adapter] = is_soft(module.selective_protected_weights[adapter])

    def is_calibrated(self, module: SelectiveLayer, adapter: str) -> bool:
        self.prepare(module, adapter)
        return module.norm_cap.get(adapter) is not None

    def check_forward(self, module: SelectiveLayer, adapter: str) -> None:
        self.prepare(module, adapter)
        if not (module.training and torch.is_grad_enabled()):
            return
        if module.requires_calibration.get(adapter) and not self.is_calibrated(module, adapter):
            raise RuntimeError(
                f"Adapter {adapter!r} is a GeometryProjected adapter that has not been calibrated, so nothing "
                "protects the old behaviour yet. Call `peft_selective.calibrate(model, protected_texts, "
                "tokenizer)` before training."
            )

    def load_pre_hook(self, module: SelectiveLayer, adapter: str, state_dict: dict, prefix: str) -> None:
        """Calibrated subspaces vary in size per layer: size the placeholders from the checkpoint before the tensors
        are copied in (needed for adapters whose config does not record `protected_dims`, saved before it existed;
        loaders that bypass `load_state_dict` need that record), and set the mirrors from it."""
        for name in module.protected_buffer_names:
            buffers = getattr(module, name)
            key = f"{prefix}{name}.{adapter}"
            if adapter in buffers and key in state_dict and state_dict[key].shape != buffers[adapter].shape:
                buffers[adapter] = torch.empty_like(state_dict[key], device=buffers[adapter].device)
        key = f"{prefix}selective_protected_stats.{adapter}"
        if adapter not in module.selective_protected_stats or key not in state_dict:
            return
        stats = ProtectedStats.from_tensor(state_dict[key])
        if stats.calibrated:
            module.norm_cap[adapter] = float(stats.norm_cap)
            weights = state_dict.get(f"{prefix}selective_protected_weights.{adapter}")
            module.soft_projection[adapter] = weights is not None and is_soft(weights)
            self.pending = False

    # ------------------------------------------------------------------------------------------------ update
    @staticmethod
    def project(module: SelectiveLayer, adapter: str, matrix: torch.Tensor) -> torch.Tensor:
        """`M (I - U diag(w) Uᵀ)` on the input side of an update factor (`selective_delta_weight` or `_A`)."""
        if adapter not in module.selective_protected_basis or module.selective_protected_basis[adapter].shape[1] == 0:
            return matrix
        basis = module.selective_protected_basis[adapter].to(matrix.dtype)
        weights = module.selective_protected_weights[adapter].to(matrix.dtype)
        return matrix - ((matrix @ basis) * weights) @ basis.T

    @staticmethod
    def cap_factor(module: SelectiveLayer, adapter: str, frobenius_sq: torch.Tensor) -> torch.Tensor | float:
        """Rescale so that the capped norm is <= norm_cap (differentiable, so training sees the cap).

        A hard projector P is idempotent, so capping the projected update `ΔW = ΔW' P` is what the bound needs. A
        soft projector is invertible: `ΔW` itself is unconstrained and the bound holds for `‖ΔW'‖_F`, the norm
        before projection, which is what gets capped then."""
        cap = module.norm_cap.get(adapter)
        if cap is None:
            return 1.0
        return torch.clamp(cap / frobenius_sq.clamp_min(1e-30).sqrt(), max=1.0)

    def delta_weight(self, module: SelectiveLayer, adapter: str) -> torch.Tensor:
        """`ΔW`, projected and norm-capped: what is merged, and what the fused full-rank forward adds."""
        self.prepare(module, adapter)
        if module.rank[adapter] is None:
            raw = module.selective_delta_weight[adapter]
            delta = self.project(module, adapter, raw)
        else:
            A, B, scale = module.selective_delta_A[adapter], module.selective_delta_B[adapter], module.scaling[adapter]
            delta = (B @ self.project(module, adapter, A)) * scale
            raw = None
        if module.norm_cap.get(adapter) is not None:
            if not module.soft_projection.get(adapter, False):
                capped = delta
            else:
                capped = raw if raw is not None else (B @ A) * scale
            delta = delta * self.cap_factor(module, adapter, capped.pow(2).sum())
        return delta

    def low_rank_factors(self, module: SelectiveLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`(A P, B, s · cap)` of the low-rank forward pass, the cap computed from r x r products."""
        self.prepare(module, adapter)
        raw_A, B = module.selective_delta_A[adapter], module.selective_delta_B[adapter]
        A, scale = self.project(module, adapter, raw_A), module.scaling[adapter]
        if module.norm_cap.get(adapter) is not None:
            capped_A = raw_A if module.soft_projection.get(adapter, False) else A
            # ‖s B A‖_F² = s² tr((BᵀB)(A Aᵀ)): r x r products instead of the full out x in matrix
            scale = scale * self.cap_factor(module, adapter, scale**2 * ((B.T @ B) * (capped_A @ capped_A.T)).sum())
        return A, B, scale


def _adapter_device(module: SelectiveLayer, adapter: str) -> torch.device:
    for params in (module.selective_delta_weight, module.selective_delta_A):
        if adapter in params:
            return params[adapter].device
    return torch.device("cpu")
