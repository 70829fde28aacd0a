"""The delta layer shared by every peft-selective method.

A targeted layer `y = W x + b` becomes `y = W x + b + Σ_active (ΔW_a x + Δb_a)`: each adapter holds an additive
update, so several adapters active at once simply add up (months 1..t stacked), disabling adapters returns exactly
the base computation, and merging adds `ΔW` into `W`. `ΔW` is a full matrix (`rank=None`) or `scale · B A`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn

from .config import SelectiveConfig


class SelectiveLayer(BaseTunerLayer):
    """Adapter state of one targeted layer: per adapter a full-rank `selective_delta_weight` or a low-rank pair
    `selective_delta_A`/`selective_delta_B`, and optionally `selective_delta_bias`. Every matrix is stored
    `(out_features, in_features)`.

    An adapter may also carry a protected input subspace (GeometryProjected): orthonormal columns `U` with removal
    weights `w`, applied to the input side of the update, `ΔW = ΔW' (I - U diag(w) Uᵀ)`, and a cap on `‖ΔW‖_F`.
    Projecting the parametrisation (not the gradients) keeps the constraint exact under any optimizer. Adapters
    without a subspace are the plain selective update."""

    # Every name starts with the tuner prefix `selective_` (shared by all three methods, as `lora_` is by LoRA and
    # AdaLoRA): PEFT finds adapter keys by that prefix (missing keys on load, `inject_adapter_in_model(state_dict=)`)
    # and so does transformers' adapter loader. peft-selective 0.1.0 saved them unprefixed, see
    # `SelectiveModel._remap_adapter_state_dict_for_load`.
    adapter_layer_names = ("selective_delta_weight", "selective_delta_A", "selective_delta_B", "selective_delta_bias")
    other_param_names = ("rank", "scaling", "norm_cap")
    # Buffers of the protected subspace; their shapes depend on calibration: created in the shapes the config records
    # (`GeometryProjectedConfig.protected_dims`), else empty and sized on load, see `_resize_protected_buffers`.
    protected_buffer_names = (
        "selective_protected_basis",
        "selective_protected_weights",
        "selective_protected_values",
        "selective_protected_stats",
    )
    # selective_protected_stats layout: [residual eigenvalue, output energy E‖y‖², calibration tokens, norm cap, outlier axes]
    _STATS_SIZE = 5

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.rank: dict[str, int | None] = {}
        self.scaling: dict[str, float] = {}
        self.selective_delta_weight = nn.ParameterDict({})
        self.selective_delta_A = nn.ParameterDict({})
        self.selective_delta_B = nn.ParameterDict({})
        self.selective_delta_bias = nn.ParameterDict({})
        # Python-side mirrors of the protected buffers, so the forward pass needs no device sync to read them:
        # `norm_cap` is set exactly when the adapter is calibrated.
        self.norm_cap: dict[str, Optional[float]] = {}
        self.soft_projection: dict[str, bool] = {}
        # Adapters whose mirrors may lag their buffers: created (placeholders), then possibly filled by a loader that
        # copies tensors in without `load_state_dict` (transformers' `load_adapter` / `from_pretrained(adapter_dir)`),
        # so neither calibration nor the pre-hook set the mirrors. Read once from the buffers, see
        # `_sync_protected_mirrors`.
        self._mirrors_pending: set[str] = set()
        self.requires_calibration: dict[str, bool] = {}
        for name in self.protected_buffer_names:
            setattr(self, name, BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    # ----------------------------------------------------------------------------------------------- adapter set-up
    def _init_shapes(self, in_features: int, out_features: int, has_bias: bool, leading: tuple[int, ...] = ()):
        self.in_features, self.out_features = in_features, out_features
        self.base_has_bias = has_bias
        # Fused MoE expert parameters carry one matrix per expert: the update gets the same leading dimension.
        self.leading_shape = leading

    def update_layer(
        self, adapter_name: str, config: SelectiveConfig, inference_mode: bool = False, protected_dim: int = 0
    ) -> None:
        """Create (or re-create) the update of `adapter_name` in this layer. `protected_dim`: the calibrated number
        of protected directions, when the config records it (`GeometryProjectedConfig.protected_dims`), so that the
        protected buffers are created in the shapes of the checkpoint about to be loaded."""
        rank = config.rank
        if rank is not None and rank > min(self.in_features, self.out_features):
            warnings.warn(
                f"rank={rank} exceeds min(in, out) = {min(self.in_features, self.out_features)} of a "
                f"{self.out_features}x{self.in_features} layer; a full-rank update (rank=None) is cheaper.",
                UserWarning,
                stacklevel=2,
            )
        self.rank[adapter_name] = rank
        self.scaling[adapter_name] = config.scaling
        lead = self.leading_shape
        if rank is None:
            self.selective_delta_weight[adapter_name] = nn.Parameter(
                torch.zeros(*lead, self.out_features, self.in_features)
            )
        else:
            self.selective_delta_A[adapter_name] = nn.Parameter(torch.empty(*lead, rank, self.in_features))
            self.selective_delta_B[adapter_name] = nn.Parameter(torch.zeros(*lead, self.out_features, rank))
        if config.train_bias and self.base_has_bias:
            self.selective_delta_bias[adapter_name] = nn.Parameter(torch.zeros(*lead, self.out_features))
        self.reset_parameters(adapter_name, config.init_weights)
        self.requires_calibration[adapter_name] = getattr(config, "requires_calibration", False)
        self.norm_cap[adapter_name] = None
        self.soft_projection.pop(adapter_name, None)
        self._mirrors_pending.discard(adapter_name)
        if self.requires_calibration[adapter_name]:
            # Zero placeholders (a no-op projection, "not calibrated" stats), so the keys exist when a calibrated
            # adapter is loaded: in the calibrated shapes when the config records them, else empty and sized on load
            # by `_resize_protected_buffers`.
            self._store_protected(
                adapter_name,
                torch.zeros(self.in_features, protected_dim),
                torch.zeros(protected_dim),
                torch.zeros(protected_dim),
                torch.zeros(self._STATS_SIZE),
            )
            self._mirrors_pending.add(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        if adapter_name in self.selective_delta_A:
            # As LoRA: A random, B zero, so the update starts at exactly zero but gradients reach B at once.
            A = self.selective_delta_A[adapter_name]
            nn.init.kaiming_uniform_(A.view(-1, A.shape[-1]), a=math.sqrt(5))
        if init_weights:
            return
        # Non-zero start, for tests only: small enough to keep activations sane, large enough to see.
        for params in (self.selective_delta_weight, self.selective_delta_B, self.selective_delta_bias):
            if adapter_name in params:
                nn.init.normal_(params[adapter_name], std=0.02)

    # ------------------------------------------------------------------------------------------ protected subspace
    def _store_protected(self, adapter: str, basis, weights, values, stats) -> None:
        device = self._adapter_device(adapter)
        for name, tensor in zip(self.protected_buffer_names, (basis, weights, values, stats)):
            # fp32 whatever the base dtype: the projection is what the guarantee rests on
            getattr(self, name)[adapter] = tensor.detach().to(device=device, dtype=torch.float32)

    def _adapter_device(self, adapter: str) -> torch.device:
        for params in (self.selective_delta_weight, self.selective_delta_A):
            if adapter in params:
                return params[adapter].device
        return torch.device("cpu")

    def set_protected_subspace(
        self, adapter: str, subspace, *, output_energy: float, norm_cap: float, num_tokens: int
    ) -> None:
        """Install a calibrated protected subspace (`geometry.subspace.ProtectedSubspace`) for `adapter`."""
        stats = torch.tensor(
            [subspace.residual_eigenvalue, output_energy, float(num_tokens), norm_cap, float(subspace.num_outliers)]
        )
        self._store_protected(adapter, subspace.basis, subspace.weights, subspace.basis_values, stats)
        self.norm_cap[adapter] = norm_cap
        self.soft_projection[adapter] = bool(subspace.soft)
        self.requires_calibration[adapter] = True
        self._mirrors_pending.discard(adapter)

    def _sync_protected_mirrors(self, adapter: str) -> None:
        """Set `norm_cap` / `soft_projection` of `adapter` from its buffers, once after it was created.

        Calibration and the load pre-hook set the mirrors themselves; transformers' adapter loaders copy the
        checkpoint into the buffers without `load_state_dict`, so a freshly created adapter is read back here, on its
        first use (forward, merge, `is_calibrated`), after any such load. One device read per adapter and layer, then
        cached: an adapter still uncalibrated then stays so until calibrated or loaded through `load_state_dict`."""
        if adapter not in self._mirrors_pending:
            return
        if adapter not in self.selective_protected_stats:
            self._mirrors_pending.discard(adapter)
            return
        stats = self.selective_protected_stats[adapter]
        if stats.is_meta:  # not materialized yet (meta-device initialization): read it later
            return
        self._mirrors_pending.discard(adapter)
        _, _, tokens, cap, _ = stats.tolist()
        if tokens > 0:
            self.norm_cap[adapter] = float(cap)
            self.soft_projection[adapter] = bool((self.selective_protected_weights[adapter] < 1).any())

    def is_calibrated(self, adapter: str) -> bool:
        self._sync_protected_mirrors(adapter)
        return self.norm_cap.get(adapter) is not None

    def _project(self, adapter: str, matrix: torch.Tensor) -> torch.Tensor:
        """`M (I - U diag(w) Uᵀ)` on the input side of an update factor (`selective_delta_weight` or `selective_delta_A`)."""
        if adapter not in self.selective_protected_basis or self.selective_protected_basis[adapter].shape[1] == 0:
            return matrix
        basis = self.selective_protected_basis[adapter].to(matrix.dtype)
        weights = self.selective_protected_weights[adapter].to(matrix.dtype)
        return matrix - ((matrix @ basis) * weights) @ basis.T

    def _cap_factor(self, adapter: str, frobenius_sq: torch.Tensor) -> torch.Tensor | float:
        """Rescale so that the capped norm is <= norm_cap (differentiable, so training sees the cap).

        A hard projector P is idempotent, so capping the projected update `ΔW = ΔW' P` is what the bound needs. A
        soft projector is invertible: `ΔW` itself is unconstrained and the bound holds for `‖ΔW'‖_F`, the norm
        before projection, which is what gets capped then."""
        cap = self.norm_cap.get(adapter)
        if cap is None:
            return 1.0
        return torch.clamp(cap / frobenius_sq.clamp_min(1e-30).sqrt(), max=1.0)

    def _check_calibrated(self, adapters: list[str]) -> None:
        for adapter in adapters:
            self._sync_protected_mirrors(adapter)
        if not (self.training and torch.is_grad_enabled()):
            return
        for adapter in adapters:
            if self.requires_calibration.get(adapter) and not self.is_calibrated(adapter):
                raise RuntimeError(
                    f"Adapter {adapter!r} is a GeometryProjected adapter that has not been calibrated, so nothing "
                    "protects the old behaviour yet. Call `peft_selective.calibrate(model, protected_texts, "
                    "tokenizer)` before training."
                )

    def _resize_protected_buffers(self, state_dict, prefix, *args) -> None:
        """Load-state-dict pre-hook: calibrated subspaces vary in size per layer, so size the placeholders from the
        checkpoint before the tensors are copied in (needed for adapters whose config does not record
        `protected_dims`, saved before it existed; loaders that bypass `load_state_dict` need that record)."""
        for name in self.protected_buffer_names:
            buffers = getattr(self, name)
            for adapter in list(buffers.keys()):
                key = f"{prefix}{name}.{adapter}"
                if key in state_dict and state_dict[key].shape != buffers[adapter].shape:
                    buffers[adapter] = torch.empty_like(state_dict[key], device=buffers[adapter].device)
        for adapter in list(self.selective_protected_stats.keys()):
            key = f"{prefix}selective_protected_stats.{adapter}"
            if key in state_dict and float(state_dict[key][2]) > 0:
                self.norm_cap[adapter] = float(state_dict[key][3])
                weights = state_dict.get(f"{prefix}selective_protected_weights.{adapter}")
                self.soft_projection[adapter] = bool(weights is not None and (weights < 1).any())
                self._mirrors_pending.discard(adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        for name in self.protected_buffer_names:
            buffers = getattr(self, name)
            if adapter_name in buffers:
                del buffers[adapter_name]
        self.requires_calibration.pop(adapter_name, None)
        self.soft_projection.pop(adapter_name, None)
        self._mirrors_pending.discard(adapter_name)
        super().delete_adapter(adapter_name)

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    # ------------------------------------------------------------------------------------------------ the update
    def _has_adapter(self, adapter: str) -> bool:
        return adapter in self.rank

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update `ΔW` of `adapter`, shaped `(*leading, out, in)` whatever the base layer's own layout
        (projected and norm-capped for GeometryProjected adapters)."""
        self._sync_protected_mirrors(adapter)
        if self.rank[adapter] is None:
            raw = self.selective_delta_weight[adapter]
            delta = self._project(adapter, raw)
        else:
            raw = self.selective_delta_B[adapter] @ self.selective_delta_A[adapter]
            delta = (
                self.selective_delta_B[adapter] @ self._project(adapter, self.selective_delta_A[adapter])
            ) * self.scaling[adapter]
            raw = raw * self.scaling[adapter]
        if self.norm_cap.get(adapter) is not None:
            capped = raw if self.soft_projection.get(adapter, False) else delta
            delta = delta * self._cap_factor(adapter, capped.pow(2).sum())
        return delta

    def get_delta_bias(self, adapter: str) -> torch.Tensor | None:
        return self.selective_delta_bias[adapter] if adapter in self.selective_delta_bias else None

    def delta_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """`ΔW x + Δb` for the 2-D case, computed in the adapter's dtype (fp32 master weights under bf16 bases)."""
        self._sync_protected_mirrors(adapter)
        bias = self.get_delta_bias(adapter)
        if self.rank[adapter] is None:
            weight = self.get_delta_weight(adapter)
            return F.linear(self._cast_input_dtype(x, weight.dtype), weight, bias)
        A, B = self._project(adapter, self.selective_delta_A[adapter]), self.selective_delta_B[adapter]
        scale = self.scaling[adapter]
        if self.norm_cap.get(adapter) is not None:
            capped_A = self.selective_delta_A[adapter] if self.soft_projection.get(adapter, False) else A
            # ‖s B A‖_F² = s² tr((BᵀB)(A Aᵀ)): r x r products instead of the full out x in matrix
            scale = scale * self._cap_factor(adapter, scale**2 * ((B.T @ B) * (capped_A @ capped_A.T)).sum())
        out = F.linear(F.linear(self._cast_input_dtype(x, A.dtype), A), B) * scale
        return out if bias is None else out + bias

    def _active_present_adapters(self) -> list[str]:
        return [a for a in self.active_adapters if self._has_adapter(a)]

    def _check_mergeable(self) -> None:
        if self.quantization_backend is not None:
            if not self.quantization_backend.supports_merge:
                raise ValueError(
                    f"Cannot merge into a {self.quantization_backend.backend_name} base layer. Load the base model "
                    "in float (bf16/fp32) and merge there."
                )
            warnings.warn(
                f"Merging into a {self.quantization_backend.backend_name} quantized base: the merged weight is "
                "re-quantized, so the merged model's outputs differ from the unmerged adapter by rounding. Merge into "
                "a bf16/fp32 copy of the base for an exact merge.",
                UserWarning,
                stacklevel=2,
            )


class Linear(nn.Module, SelectiveLayer):
    """Selective update on `nn.Linear` (and subclasses: bitsandbytes 4/8-bit, Falcon's linear) and GPT-2's `Conv1D`.

    Quantized bases (bitsandbytes) and low-rank updates add `ΔW x` to the base layer's own output, so stored 4-bit
    weights are never dequantized during training. A full-rank update on a float base is applied as one matmul with
    `W + ΔW`, which costs the same as the base layer instead of two matmuls.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SelectiveConfig, protected_dim: int = 0, **kwargs: Any
    ) -> None:
        super().__init__()
        SelectiveLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        # Conv1D stores its weight as (in, out): remember it so merges transpose the update.
        self.fan_in_fan_out = type(base).__name__ == "Conv1D"
        in_features, out_features = _get_in_out_features(base)
        self._init_shapes(in_features, out_features, getattr(base, "bias", None) is not None)
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._resize_protected_buffers)
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode, protected_dim=protected_dim)

    def _weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the updates of `adapter_names` (default: the active ones) into the base weight and bias."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if self._has_adapter(a)]
        if not adapter_names:
            return
        self._check_mergeable()
        base = self.get_base_layer()
        for adapter in adapter_names:
            weight = self.get_base_weight()
            delta = self._weight_layout(self.get_delta_weight(adapter)).detach().to(weight.dtype)
            merged = weight.clone() + delta if safe_merge else weight + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights: adapter {adapter!r} seems to be broken.")
            self.set_base_weight(merged)
            delta_bias = self.get_delta_bias(adapter)
            if delta_bias is not None:
                base.bias.data += delta_bias.detach().to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight(
                weight - self._weight_layout(self.get_delta_weight(adapter)).detach().to(weight.dtype)
            )
            delta_bias = self.get_delta_bias(adapter)
            if delta_bias is not None:
                base.bias.data -= delta_bias.detach().to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active_present_adapters()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        self._check_calibrated(adapters)
        if self.quantization_backend is None and all(self.rank[a] is None for a in adapters):
            return self._fused_forward(x, adapters)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in adapters:
            result = result + self.delta_output(x, adapter).to(result.dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self._weight_layout(base.weight)
        bias = base.bias
        for adapter in adapters:
            weight = weight + self.get_delta_weight(adapter).to(weight.dtype)
            delta_bias = self.get_delta_bias(adapter)
            if delta_bias is not None:
                bias = bias + delta_bias.to(bias.dtype)
        return F.linear(self._cast_input_dtype(x, weight.dtype), weight, bias)

    def __repr__(self) -> str:
        return "selective." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)


class ParamWrapper(nn.Module, SelectiveLayer):
    """Selective update on a 3-D parameter of a fused MoE experts module (`experts.gate_up_proj`, shape
    `(num_experts, out, in)` as in transformers >= 5): each expert gets its own update. The experts module is
    called with `W + ΔW` substituted for the parameter (`torch.func.functional_call`), so any routing code it has
    runs unchanged. The class name matches PEFT's own `ParamWrapper`, which PEFT's injection code looks for when a
    second adapter targets the same parameter.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SelectiveConfig, parameter_name: str, **kwargs: Any
    ) -> None:
        super().__init__()
        SelectiveLayer.__init__(self, base_layer, **kwargs)
        self.parameter_name = parameter_name
        param = getattr(self.get_base_layer(), parameter_name)
        if param.dim() != 3:
            raise ValueError(
                f"Only 3-D expert parameters (num_experts, out, in) can be targeted, got {parameter_name} with shape "
                f"{tuple(param.shape)}."
            )
        num_experts, out_features, in_features = param.shape
        self._init_shapes(in_features, out_features, has_bias=False, leading=(num_experts,))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def _base_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def get_base_weight(self) -> torch.Tensor:
        return self._base_param().data

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        self._base_param().data = weight_data

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if self._has_adapter(a)]
        for adapter in adapter_names:
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).detach().to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights: adapter {adapter!r} seems to be broken.")
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight(weight - self.get_delta_weight(adapter).detach().to(weight.dtype))

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """Called by PEFT's `merge_and_unload` / `unload` instead of `merge` + `get_base_layer`. Targeting two
        parameters of one experts module (e.g. `gate_up_proj` and `down_proj` with `train_down_proj=True`) nests one
        wrapper in the other, and PEFT only visits the outer one: merge every level, or the inner update is lost."""
        module: nn.Module = self
        while isinstance(module, ParamWrapper):
            if merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            module = module.base_layer
        return module

    def _param_path(self) -> str:
        # The parameter's name relative to `self.base_layer`: with nested wrappers (see above) it sits under one
        # `base_layer.` per inner wrapper. `functional_call(strict=False)` silently ignores a name that does not
        # resolve to the parameter, which would drop this wrapper's update without any error.
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, ParamWrapper):
            path, module = f"base_layer.{path}", module.base_layer
        return path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [] if (self.disable_adapters or self.merged) else self._active_present_adapters()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        param = self._base_param()
        weight = param
        for adapter in adapters:
            weight = weight + self.get_delta_weight(adapter).to(param.dtype)
        return torch.func.functional_call(self.base_layer, {self._param_path(): weight}, args, kwargs, strict=False)

    def __repr__(self) -> str:
        return "selective." + super().__repr__()
