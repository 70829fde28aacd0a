"""Choosing, per layer, the input subspace an update must stay away from, and the bound that choice gives.

For a layer `y = W x` and an update `ΔW` whose rows are projected as `ΔW (I - U diag(w) Uᵀ)`, the change of the
output on protected inputs obeys, exactly and for any `ΔW`,

    E‖ΔW x‖² = tr(ΔW P C P ΔWᵀ) ≤ λ_bound · ‖ΔW‖_F²,   λ_bound = max(max_i λ_i (1 - w_i)², λ_rest)

where `C = E[x xᵀ] = Σ λ_i u_i u_iᵀ` and `λ_rest` is the largest eigenvalue outside `U`. With a cap `‖ΔW‖_F ≤ ρ`
the relative change `sqrt(E‖ΔW x‖² / E‖y‖²)` is at most `sqrt(λ_bound) ρ / sqrt(E‖y‖²)`. A hard projector
(`w_i = 1` on the top-k eigenvectors) takes the smallest `k` for which that bound is below the tolerance δ. Where
that leaves too little room, a soft projector `w_i = λ_i / (λ_i + α)` over the whole spectrum keeps some freedom in
every direction, with `λ_bound = max_i λ_i α² / (λ_i + α)² ≤ α / 4`; a soft projector is invertible, so there the
norm cap applies to the update before projection, `‖ΔW'‖_F ≤ ρ` (the layer does this).

Massive activations (a few input coordinates that are orders of magnitude larger than the rest) are deflated first:
their coordinate axes are protected outright and the eigendecomposition runs on the rest, which keeps it accurate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ProtectedSubspace:
    """The protected directions of one layer input.

    Attributes:
        basis: `(in, m)` orthonormal columns `U`.
        weights: `(m,)` removal weights `w` (1 = direction fully removed from the update, hard projector).
        basis_values: `(m,)` second moment of the protected data along each basis direction.
        residual_eigenvalue: `λ_bound` above: the worst-case output energy per unit `‖ΔW‖_F²`.
        eigenvalues: `(in,)` spectrum of `C` (descending), kept for reports and for extending the subspace.
        num_outliers: massive-activation axes protected before the eigendecomposition.
        soft: whether the soft projector was used.
    """

    basis: torch.Tensor
    weights: torch.Tensor
    basis_values: torch.Tensor
    residual_eigenvalue: float
    eigenvalues: torch.Tensor
    num_outliers: int = 0
    soft: bool = False

    @property
    def dim(self) -> int:
        """Protected dimension: number of hard-removed directions (effective count for a soft projector)."""
        return int(self.weights.sum().round()) if self.soft else self.basis.shape[1]

    @property
    def free_dim(self) -> int:
        return self.basis.shape[0] - self.dim

    def bound(self, norm_cap: float, output_energy: float) -> float:
        """Upper bound of the relative output change on protected data for `‖ΔW‖_F ≤ norm_cap`."""
        return relative_output_bound(self.residual_eigenvalue, norm_cap, output_energy)


def relative_output_bound(residual_eigenvalue: float, norm_cap: float, output_energy: float) -> float:
    """The guarantee: `sqrt(E‖ΔW x‖² / E‖y‖²) ≤ sqrt(λ_bound) ρ / sqrt(E‖y‖²)` for any update with `‖ΔW‖_F ≤ ρ`
    (see the module docstring). The one place the formula is written: calibration and saved adapters both use it."""
    return math.sqrt(max(residual_eigenvalue, 0.0)) * norm_cap / math.sqrt(max(output_energy, 1e-30))


def _outlier_axes(covariance: torch.Tensor, outlier_ratio: float) -> torch.Tensor:
    diag = covariance.diagonal()
    median = diag.median().clamp_min(1e-30)
    return torch.nonzero(diag > outlier_ratio * median).flatten()


@dataclass
class Spectrum:
    """Eigendecomposition of an input second moment, after deflating massive-activation axes.

    `axes_basis` `(in, a)` holds the protected coordinate axes, `vectors` `(in, n-a)` / `values` `(n-a,)` the
    eigenpairs of the rest, in descending order."""

    axes_basis: torch.Tensor
    axes_values: torch.Tensor
    vectors: torch.Tensor
    values: torch.Tensor


def decompose(covariance: torch.Tensor, outlier_ratio: float = 100.0) -> Spectrum:
    """Eigendecompose `covariance` (fp64) after protecting its massive-activation axes (second moment above
    `outlier_ratio` x the median; `0` or `inf` disables)."""
    c = covariance.double()
    n = c.shape[0]
    # Every helper tensor on the covariance's device: statistics collected on a GPU stay there.
    device = c.device
    no_axes = torch.empty(0, dtype=torch.long, device=device)
    axes = _outlier_axes(c, outlier_ratio) if 0 < outlier_ratio < math.inf else no_axes
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[axes] = False
    axes_basis = torch.zeros(n, len(axes), dtype=c.dtype, device=device)
    axes_basis[axes, torch.arange(len(axes), device=device)] = 1.0
    values, sub_vectors = torch.linalg.eigh(c[keep][:, keep])
    vectors = torch.zeros(n, sub_vectors.shape[1], dtype=c.dtype, device=device)
    vectors[keep] = sub_vectors
    order = torch.argsort(values, descending=True)
    return Spectrum(axes_basis, c.diagonal()[axes], vectors[:, order], values[order].clamp_min(0.0))


def choose_subspace(
    spectrum: Spectrum,
    output_energy: float,
    *,
    tolerance: float,
    norm_cap: float,
    min_free_dim: int = 0,
) -> ProtectedSubspace:
    """Pick the protected subspace of one layer from the spectrum of its input.

    Args:
        output_energy: `E‖y‖²` of the layer on the protected data.
        tolerance: δ, the allowed relative change of the layer output on protected data.
        norm_cap: ρ, the cap on `‖ΔW‖_F` the bound assumes (enforced by the layer).
        min_free_dim: if the hard projector leaves fewer free directions than this, use the soft projector.
    """
    threshold = (tolerance**2) * output_energy / (norm_cap**2)
    lam, vecs, num_axes = spectrum.values, spectrum.vectors, spectrum.axes_basis.shape[1]
    all_values = torch.cat([spectrum.axes_values, lam]).sort(descending=True).values.float()
    k = int((lam > threshold).sum())
    if len(lam) - k >= min_free_dim or len(lam) == 0:
        basis = torch.cat([spectrum.axes_basis, vecs[:, :k]], dim=1)
        return ProtectedSubspace(
            basis=basis.float(),
            weights=torch.ones(basis.shape[1], device=basis.device),
            basis_values=torch.cat([spectrum.axes_values, lam[:k]]).float(),
            residual_eigenvalue=float(lam[k]) if k < len(lam) else 0.0,
            eigenvalues=all_values,
            num_outliers=num_axes,
        )
    # Soft projector: every direction keeps a share α/(λ+α) of the update, α the hard threshold.
    alpha = threshold
    shrink = alpha / (lam + alpha)
    return ProtectedSubspace(
        basis=torch.cat([spectrum.axes_basis, vecs], dim=1).float(),
        weights=torch.cat([torch.ones(num_axes, dtype=lam.dtype, device=lam.device), 1.0 - shrink]).float(),
        basis_values=torch.cat([spectrum.axes_values, lam]).float(),
        residual_eigenvalue=float((lam * shrink**2).max()),
        eigenvalues=all_values,
        num_outliers=num_axes,
        soft=True,
    )


def covariance_upper_bound(basis: torch.Tensor, basis_values: torch.Tensor, residual: float) -> torch.Tensor:
    """A second moment `⪰` the one a subspace was chosen from, rebuilt from what an adapter stores:
    `U diag(λ_U) Uᵀ + λ_rest (I - U Uᵀ)`. Extending protection month after month from this bound is conservative:
    earlier data is never protected less than it was."""
    u = basis.double()
    n = u.shape[0]
    eye = torch.eye(n, dtype=u.dtype, device=u.device)
    return (u * basis_values.double().to(u.device)) @ u.T + residual * (eye - u @ u.T)


def combine_second_moments(moments: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Protect several data sets at once: the sum of their second moments, each already scaled by its weight.
    Each data set counts in full (not token-averaged), so a small month is not drowned by a large corpus."""
    device = moments[0][0].device  # a stored bound (on the layer's device) may meet statistics kept elsewhere
    return sum(m.double().to(device) * w for m, w in moments)
