"""The delta layer shared by every peft-selective method.

A targeted layer `y = W x + b` becomes `y = W x + b + Σ_active (ΔW_a x + Δb_a)`: each adapter holds an additive
update, so several adapters active at once simply add up (months 1..t stacked), disabling adapters returns exactly
the base computation, and merging adds `ΔW` into `W`. `ΔW` is a full matrix (`rank=None`) or `scale · B A`.

Optional behaviour of an adapter on this shared layer is a variant (`SelectiveVariant`), as PEFT does it for LoRA
(`LoraVariant`, e.g. DoRA): the layer calls the variant's hooks (init, forward factors, delta weight for merging,
load pre-hook, delete) for the adapters that have one. GeometryProjected's projection and norm cap are the variant
`ProjectedVariant` of `..geometry.variant`, which registers itself under a name (`register_variant`) that its config
gives (`SelectiveConfig.layer_variant`), so this package never imports the geometry one.
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


class SelectiveVariant:
    """Optional behaviour of one adapter of a [`SelectiveLayer`] (as PEFT's `LoraVariant`).

    The layer creates one instance per adapter whose config names the variant (`SelectiveConfig.layer_variant`), keeps
    it in `layer.selective_variant[adapter]` and calls these hooks instead of (or besides) its plain code. Tensors
    that must be saved with the adapter are declared by the layer (as LoRA declares DoRA's magnitude), so that the
    state-dict keys never depend on which variants are registered."""

    def init(self, module: SelectiveLayer, adapter: str, config: SelectiveConfig, module_name: str | None) -> None:
        """Called by `update_layer` once the adapter's parameters exist (`module_name`: the tuner's full name of the
        layer when known)."""

    def prepare(self, module: SelectiveLayer, adapter: str) -> None:
        """Called before the adapter's update is used (forward, merge, queries): bring lazy state up to date."""

    def check_forward(self, module: SelectiveLayer, adapter: str) -> None:
        """Called before a forward pass that uses the adapter (may refuse to run, e.g. an uncalibrated adapter)."""
        self.prepare(module, adapter)

    def delta_weight(self, module: SelectiveLayer, adapter: str) -> torch.Tensor:
        """The update `ΔW` (merge, unmerge, fused full-rank forward), shaped `(*leading, out, in)`."""
        raise NotImplementedError

    def low_rank_factors(self, module: SelectiveLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`(A, B, scale)` of a low-rank adapter's forward pass, `ΔW x = scale · B (A x)`."""
        raise NotImplementedError

    def load_pre_hook(self, module: SelectiveLayer, adapter: str, state_dict: dict, prefix: str) -> None:
        """Called from the layer's `load_state_dict` pre-hook, before the checkpoint's tensors are copied in."""

    def delete(self, module: SelectiveLayer, adapter: str) -> None:
        """Called when the adapter is deleted from the layer."""


#: Variant classes by name. Filled by the packages that define them (GeometryProjected registers "projected" in
#: `tuners/geometry/__init__.py`), so that this module never imports them.
VARIANTS: dict[str, type[SelectiveVariant]] = {}
#: The variant that owns the protected-subspace buffers (`SelectiveLayer.protected_buffer_names`).
PROTECTED_SUBSPACE_VARIANT = "projected"


def register_variant(name: str, variant_cls: type[SelectiveVariant]) -> None:
    """Make `variant_cls` available to configs whose `layer_variant` is `name` (idempotent for the same class)."""
    if VARIANTS.get(name, variant_cls) is not variant_cls:
        raise KeyError(f"A different selective layer variant is already registered as {name!r}: {VARIANTS[name]}.")
    VARIANTS[name] = variant_cls


def _variant_class(name: str) -> type[SelectiveVariant]:
    if name not in VARIANTS:
        raise KeyError(
            f"Unknown selective layer variant {name!r} (registered: {sorted(VARIANTS)}); it is registered when the "
            "package that defines it is imported (`import peft_selective` imports them all)."
        )
    return VARIANTS[name]


class SelectiveLayer(BaseTunerLayer):
    """Adapter state of one targeted layer: per adapter a full-rank `selective_delta_weight` or a low-rank pair
    `selective_delta_A`/`selective_delta_B`, and optionally `selective_delta_bias`. Every matrix is stored
    `(out_features, in_features)`.

    An adapter may have a variant (`selective_variant[adapter]`, see [`SelectiveVariant`]) that changes how its update
    is applied. The one variant today is GeometryProjected's (`..geometry.variant.ProjectedVariant`): a protected
    input subspace, projected out of the update, and a cap on `‖ΔW‖_F`. Its tensors are declared here
    (`protected_buffer_names`) so that their state-dict keys are the layer's, and so are the Python-side mirrors
    `norm_cap` / `soft_projection` that code outside the variant reads; everything else about it is the variant's.
    Adapters without a variant are the plain selective update."""

    # Every name starts with the tuner prefix `selective_` (shared by all three methods, as `lora_` is by LoRA and
    # AdaLoRA): PEFT finds adapter keys by that prefix (missing keys on load, `inject_adapter_in_model(state_dict=)`)
    # and so does transformers' adapter loader. peft-selective 0.1.0 saved them unprefixed, see
    # `SelectiveModel._remap_adapter_state_dict_for_load`.
    adapter_layer_names = ("selective_delta_weight", "selective_delta_A", "selective_delta_B", "selective_delta_bias")
    other_param_names = ("rank", "scaling", "norm_cap")
    # Buffers of the protected subspace of the "projected" variant, persistent (saved with the adapter); created and
    # sized by the variant (`ProjectedVariant.init` / `.load_pre_hook`). `selective_protected_stats` is the 5-vector
    # of `..geometry.variant.ProtectedStats`.
    protected_buffer_names = (
        "selective_protected_basis",
        "selective_protected_weights",
        "selective_protected_values",
        "selective_protected_stats",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.rank: dict[str, int | None] = {}
        self.scaling: dict[str, float] = {}
        self.selective_delta_weight = nn.ParameterDict({})
        self.selective_delta_A = nn.ParameterDict({})
        self.selective_delta_B = nn.ParameterDict({})
        self.selective_delta_bias = nn.ParameterDict({})
        self.selective_variant: dict[str, SelectiveVariant] = {}
        # Python-side mirrors of the projected variant's buffers, so the forward pass needs no device sync to read
        # them: `norm_cap` (cap on ‖ΔW‖_F, None: no cap) is set exactly when the adapter is calibrated.
        self.norm_cap: dict[str, Optional[float]] = {}
        self.soft_projection: dict[str, bool] = {}
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
        self,
        adapter_name: str,
        config: SelectiveConfig,
        inference_mode: bool = False,
        module_name: Optional[str] = None,
    ) -> None:
        """Create (or re-create) the update of `adapter_name` in this layer, with the variant its config names.
        `module_name`: the tuner's full name of this layer, for variants whose config records per-module state."""
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
        self.requires_calibration[adapter_name] = False
        self.norm_cap[adapter_name] = None
        self.soft_projection.pop(adapter_name, None)
        self.selective_variant.pop(adapter_name, None)
        variant_name = getattr(config, "layer_variant", None)
        if variant_name is not None:
            variant = self.selective_variant[adapter_name] = _variant_class(variant_name)()
            variant.init(self, adapter_name, config, module_name)
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

    # ---------------------------------------------------------------------------------------------------- variants
    # Entry points of the projected variant kept on the layer (calibration, `peft_selective.retention` and tests use
    # them); they do nothing for adapters without a variant. The behaviour is `ProjectedVariant`'s.
    def set_protected_subspace(
        self, adapter: str, subspace, *, output_energy: float, norm_cap: float, num_tokens: int
    ) -> None:
        """Install a calibrated protected subspace (`geometry.subspace.ProtectedSubspace`) for `adapter`, giving it
        the projected variant if it has none."""
        variant = self.selective_variant.get(adapter)
        if variant is None:
            variant = self.selective_variant[adapter] = _variant_class(PROTECTED_SUBSPACE_VARIANT)()
        variant.install(self, adapter, subspace, output_energy=output_energy, norm_cap=norm_cap, num_tokens=num_tokens)

    def is_calibrated(self, adapter: str) -> bool:
        variant = self.selective_variant.get(adapter)
        return variant is not None and variant.is_calibrated(self, adapter)

    def _sync_protected_mirrors(self, adapter: str) -> None:
        if adapter in self.selective_variant:
            self.selective_variant[adapter].prepare(self, adapter)

    def _project(self, adapter: str, matrix: torch.Tensor) -> torch.Tensor:
        """The input-side projection of an update factor (`matrix` itself without a variant)."""
        variant = self.selective_variant.get(adapter)
        return matrix if variant is None else variant.project(self, adapter, matrix)

    def _cap_factor(self, adapter: str, frobenius_sq: torch.Tensor) -> torch.Tensor | float:
        """The norm-cap rescaling of an update whose squared Frobenius norm is `frobenius_sq` (1 without a cap)."""
        variant = self.selective_variant.get(adapter)
        return 1.0 if variant is None else variant.cap_factor(self, adapter, frobenius_sq)

    def _load_pre_hook_of_variants(self, state_dict, prefix, *args) -> None:
        """`load_state_dict` pre-hook: lets each adapter's variant prepare for the checkpoint (size its buffers)."""
        for adapter, variant in list(self.selective_variant.items()):
            variant.load_pre_hook(self, adapter, state_dict, prefix)

    def delete_adapter(self, adapter_name: str) -> None:
        variant = self.selective_variant.pop(adapter_name, None)
        if variant is not None:
            variant.delete(self, adapter_name)
        for name in self.protected_buffer_names:
            buffers = getattr(self, name)
            if adapter_name in buffers:
                del buffers[adapter_name]
        self.requires_calibration.pop(adapter_name, None)
        self.soft_projection.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    # ------------------------------------------------------------------------------------------------ the update
    def _has_adapter(self, adapter: str) -> bool:
        return adapter in self.rank

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update `ΔW` of `adapter`, shaped `(*leading, out, in)` whatever the base layer's own layout (as its
        variant makes it, e.g. projected and norm-capped for GeometryProjected adapters)."""
        variant = self.selective_variant.get(adapter)
        if variant is not None:
            return variant.delta_weight(self, adapter)
        if self.rank[adapter] is None:
            return self.selective_delta_weight[adapter]
        return (self.selective_delta_B[adapter] @ self.selective_delta_A[adapter]) * self.scaling[adapter]

    def get_delta_bias(self, adapter: str) -> torch.Tensor | None:
        return self.selective_delta_bias[adapter] if adapter in self.selective_delta_bias else None

    def delta_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """`ΔW x + Δb` for the 2-D case, computed in the adapter's dtype (fp32 master weights under bf16 bases)."""
        bias = self.get_delta_bias(adapter)
        if self.rank[adapter] is None:
            weight = self.get_delta_weight(adapter)
            return F.linear(self._cast_input_dtype(x, weight.dtype), weight, bias)
        variant = self.selective_variant.get(adapter)
        if variant is not None:
            A, B, scale = variant.low_rank_factors(self, adapter)
        else:
            A, B, scale = self.selective_delta_A[adapter], self.selective_delta_B[adapter], self.scaling[adapter]
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
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SelectiveConfig,
        module_name: Optional[str] = None,
        **kwargs: Any,
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
        self._register_load_state_dict_pre_hook(self._load_pre_hook_of_variants)
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode, module_name=module_name)

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
        for adapter in adapters:
            if adapter in self.selective_variant:
                self.selective_variant[adapter].check_forward(self, adapter)
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
