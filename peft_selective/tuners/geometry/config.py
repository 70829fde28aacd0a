"""Config of GeometryProjected: the selective update, constrained away from the protected subspace.

A preset of the selective config whose adapters get the layer variant `variant.ProjectedVariant`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ...targets import Role
from ..selective.config import SelectiveConfig


#: How calibration weighs the protected tokens (`GeometryProjectedConfig.calibration_weighting`).
CALIBRATION_WEIGHTINGS = ("inputs", "keep_loss_gradient")


@dataclass
class GeometryProjectedConfig(SelectiveConfig):
    """
    GeometryProjected: an update that provably leaves the model's behaviour on protected data (pre-training-like
    text, safety prompts, earlier months' data) in place, up to a tolerance you choose.

    For each targeted layer `y = W x`, a calibration pass ([`peft_selective.calibrate`]) measures the input second
    moment `C = E[x xᵀ]` on protected data and picks the protected subspace `U` (its top eigenvectors). The update is
    parametrised as `ΔW = B A (I - U Uᵀ)` (or a full matrix, projected the same way), which keeps
    `E‖ΔW x‖² ≤ λ_bound ‖ΔW‖_F²` under any optimizer and weight decay, since it is the parametrisation that is
    projected, not the gradients. A cap on `‖ΔW‖_F` makes the bound on the relative output change unconditional.
    Everything else is the selective delta layer: same adapters life-cycle, stacking, 4-bit bases.

    Args:
        tolerance (`float`):
            δ: allowed relative change of each layer's output on protected data, `sqrt(E‖ΔW x‖²/E‖y‖²) ≤ δ`.
        norm_cap (`float`):
            ρ: cap on `‖ΔW‖_F` per layer, enforced in the forward pass (the update is rescaled when it exceeds ρ).
        outlier_ratio (`float`):
            Input axes whose second moment exceeds this multiple of the median (massive activations) are protected
            before the eigendecomposition.
        min_free_dim (`int`):
            Where the hard projector would leave fewer free input directions than this, a soft projector
            `U diag(λ/(λ+α)) Uᵀ` is used instead (every direction keeps some freedom, the bound still holds).
        min_tokens_per_dim (`float`):
            Calibration must see at least this many protected tokens per input dimension; fewer gives rank-deficient
            statistics whose "free" directions are just unobserved ones, and calibration refuses.
        select_fraction (`Optional[float]`):
            "Which weights can be updated": keep only this fraction of the candidate modules, ranked by the share of
            the *new* data's input energy outside their protected subspace (needs `new_data` in calibration).
            `None` adapts every candidate.
        calibration_max_memory_mb (`float`):
            Memory bound for the accumulated statistics; more layers are handled in several passes.
        calibration_weighting (`str`):
            How calibration weighs the protected tokens. `"inputs"` (default): every token alike, so `U` spans the
            directions the protected inputs take. `"keep_loss_gradient"`: each token by `‖∂L/∂y‖²` at the layer's
            output, `L` the model's negative log-likelihood of its own next tokens at the protected positions (e.g.
            the month t−1 model's answers to off-scope prompts), so `U` follows the gradient subspace of that keep
            loss, `Σ (∂L/∂y) xᵀ`: the directions that would move the kept answers first are protected first. It costs
            a backward pass per calibration batch, and the bounds are on the output change weighed the same way
            (`measure_guarantees` measures it unweighted, which may exceed them).
        protected_dims (`dict[str, int]`):
            Filled by calibration, not by you (as LoRA's `rank_pattern` records per-module ranks): for every
            calibrated module (full name as the tuner sees it, e.g. `model.layers.0.mlp.gate_proj`), the number of
            stored protected directions, i.e. the columns of `U` (for a soft projector every input direction, more
            than the report's effective `protected_dim`). Saved in `adapter_config.json`, so that injecting the
            adapter creates its `selective_protected_*` buffers in their calibrated shapes: loaders that copy the
            checkpoint's tensors in without `load_state_dict` (transformers' `model.load_adapter(dir)` and
            `AutoModelForCausalLM.from_pretrained(adapter_dir)`) then load it as they load LoRA. A module missing here
            (adapters saved before this field existed) gets empty placeholders, sized from the checkpoint by a
            `load_state_dict` pre-hook, which PEFT's loaders run; loading such an adapter through PEFT also fills
            this field from the checkpoint, so saving it again makes it loadable by transformers too.
        (all other options: see [`SelectiveConfig`]; `rank` defaults to 16 here, `rank=None` gives a projected
        full-rank update; biases are never trained.)
    """

    rank: Optional[int] = field(default=16, metadata={"help": "Rank of the update; None for a full-rank update."})
    train_bias: bool = field(default=False, metadata={"help": "Always False: a bias update moves every output."})
    tolerance: float = field(default=0.05, metadata={"help": "Allowed relative output change on protected data."})
    norm_cap: float = field(default=1.0, metadata={"help": "Cap on the Frobenius norm of each layer's update."})
    outlier_ratio: float = field(default=100.0, metadata={"help": "Massive-activation axis threshold (x median)."})
    min_free_dim: int = field(default=8, metadata={"help": "Below this many free directions use a soft projector."})
    min_tokens_per_dim: float = field(default=2.0, metadata={"help": "Protected tokens needed per input dimension."})
    select_fraction: Optional[float] = field(
        default=None, metadata={"help": "Keep this fraction of modules, ranked by free capacity for the new data."}
    )
    calibration_max_memory_mb: float = field(default=2048, metadata={"help": "Memory bound of the statistics."})
    calibration_weighting: str = field(
        default="inputs",
        metadata={"help": "'inputs' or 'keep_loss_gradient': how calibration weighs the protected tokens."},
    )
    protected_dims: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Set by calibration: stored protected directions per module, so loaders size the buffers."},
    )

    target_roles: ClassVar[frozenset[Role]] = frozenset({Role.MLP_INPUT, Role.ATTENTION})
    peft_type_name: ClassVar[str] = "GEOMETRY_PROJECTED"
    # the layer applies the update through `variant.ProjectedVariant` (registered under this name by the package)
    layer_variant: ClassVar[Optional[str]] = "projected"
    requires_calibration: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.train_bias:
            raise ValueError("GeometryProjectedConfig does not train biases: a bias update shifts every output.")
        if not 0 < self.tolerance:
            raise ValueError(f"`tolerance` must be positive, got {self.tolerance}.")
        if not 0 < self.norm_cap:
            raise ValueError(f"`norm_cap` must be positive, got {self.norm_cap}.")
        if self.select_fraction is not None and not 0 < self.select_fraction <= 1:
            raise ValueError(f"`select_fraction` must be in (0, 1], got {self.select_fraction}.")
        if self.calibration_weighting not in CALIBRATION_WEIGHTINGS:
            raise ValueError(
                f"`calibration_weighting` must be one of {list(CALIBRATION_WEIGHTINGS)}, got {self.calibration_weighting!r}."
            )
        bad = {k: v for k, v in (self.protected_dims or {}).items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"`protected_dims` maps module names to non-negative ints, got {bad}.")
        self.protected_dims = dict(self.protected_dims or {})

    def protected_dim(self, module_name: str) -> int:
        """Stored protected directions of `module_name` (0: not recorded, the buffers are sized on load).

        An exact name first; else a recorded name that `module_name` ends with (`.`-separated), for a model wrapped
        differently from the one calibrated (e.g. `LlamaModel` vs `LlamaForCausalLM`), as PEFT matches `rank_pattern`.
        """
        if module_name in self.protected_dims:
            return self.protected_dims[module_name]
        for name, dim in self.protected_dims.items():
            if module_name.endswith(f".{name}"):
                return dim
        return 0
