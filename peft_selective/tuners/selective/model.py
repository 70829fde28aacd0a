"""The PEFT tuner of the selective methods: resolves the preset's targets and swaps in the delta layers.

The presets' tuner classes are registered with PEFT by this package's `__init__.py`; GeometryProjected's tuner
(`..geometry.model`) subclasses `SelectiveModel`."""

from __future__ import annotations

import re
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...quantization import keep_4bit_layers_trainable
from ...registration import PREFIX
from ...targets import is_linear_like, resolve_targets
from .config import SAProjConfig, SelectiveConfig, SelectiveMLPConfig
from .layer import Linear, ParamWrapper, SelectiveLayer


class SelectiveModel(BaseTuner):
    """
    Adds selective updates to a transformers (or any torch) model. Created by `peft.get_peft_model` from a preset
    config; not meant to be instantiated directly.

    Example:

        ```py
        >>> import peft_selective  # registers the methods with PEFT (automatic once installed, see README)
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_selective.SelectiveMLPConfig(rank=None))
        >>> model.print_trainable_parameters()
        ```
    """

    # One prefix for every preset (registered for each, as LoRA and AdaLoRA share `lora_`): the presets share the layer,
    # whose adapter tensors are all named `selective_*`. PEFT and transformers tell adapter keys by this prefix.
    prefix: str = PREFIX
    tuner_layer_cls = SelectiveLayer
    # Targets come from the model's structure (`targets.resolve_targets`), not from a model_type table.
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config,
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        # `inject_adapter_in_model(config, model, state_dict=...)` finds the layers to adapt from the state dict's keys
        # (the part before `.selective_`): accept a 0.1.0 checkpoint's unprefixed names there too.
        if state_dict is not None:
            state_dict = rename_legacy_keys(state_dict)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys -> model keys, accepting adapters saved by peft-selective 0.1.0.

        0.1.0 named the adapter tensors without the tuner prefix (`...gate_proj.delta_A`, now
        `...gate_proj.selective_delta_A`). This classmethod is PEFT's seam for checkpoint formats (LoRA renames its
        pre-refactor DoRA keys here): `set_peft_model_state_dict` calls it on every checkpoint before the adapter name
        is inserted, so `PeftModel.from_pretrained`, `load_adapter` and `set_peft_model_state_dict` all load old files,
        and old and new names can never both reach the model. transformers' own loaders (`model.load_adapter(dir)` on
        a transformers model, `AutoModel*.from_pretrained(adapter_dir)`) read the file without this hook: they report
        a 0.1.0 adapter's tensors as missing; re-save it once with `PeftModel.from_pretrained(...).save_pretrained`.
        """
        state_dict = rename_legacy_keys(state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _prepare_adapter_config(self, peft_config: SelectiveConfig, model_config: dict) -> SelectiveConfig:
        if peft_config.target_modules is None and peft_config.target_parameters is None:
            resolved = resolve_targets(
                self.model,
                peft_config.roles(),
                layers_to_transform=peft_config.layers_to_transform,
                layers_pattern=peft_config.layers_pattern,
            )
            # Recording the concrete names makes the saved adapter_config.json say exactly what was adapted.
            peft_config.target_modules = set(resolved.modules) if resolved.modules else None
            # PEFT applies `exclude_modules` to `target_modules` only, never to `target_parameters`: drop the
            # resolved expert parameters whose experts module is excluded here, or they would be adapted anyway.
            parameters = [p for p in resolved.parameters if not _is_excluded(p.rpartition(".")[0], peft_config)]
            peft_config.target_parameters = parameters or None
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Before the layers are built (they may read the base weight); also runs on `add_adapter` / `load_adapter`.
        # bitsandbytes' CPU repacking of 4-bit weights would cut the gradient: see `peft_selective.quantization`.
        keep_4bit_layers_trainable(model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner._replace_module re-assigns `child.base_layer.weight` (and `.bias`) onto a replacement module that
        # has no `base_layer`, i.e. when unloading. An unloaded ParamWrapper gives back the fused experts module,
        # which has no `weight` attribute (AttributeError in merge_and_unload); its parameters are already in place.
        base = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        if not hasattr(new_module, "base_layer") and new_module is base and not hasattr(base, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _create_and_replace(
        self,
        peft_config: SelectiveConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        # `current_key` reaches the adapter's layer variant, whose config may record per-module state
        # (GeometryProjected: the calibrated size of each module's protected buffers).
        if parameter_name is not None:
            if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
                target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
                return
            new_module = ParamWrapper(target, adapter_name, peft_config, parameter_name=parameter_name)
        elif isinstance(target, Linear):
            target.update_layer(
                adapter_name, peft_config, inference_mode=peft_config.inference_mode, module_name=current_key
            )
            return
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not is_linear_like(base):
                raise TypeError(
                    f"Target module {current_key!r} is a {type(base).__name__}; peft-selective adapts torch.nn.Linear "
                    "(including bitsandbytes Linear4bit / Linear8bitLt) and transformers' Conv1D. Remove it from "
                    "`target_modules` or add it to `exclude_modules`."
                )
            new_module = Linear(target, adapter_name, peft_config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated, as in PEFT
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


# The adapter tensor names of peft-selective 0.1.0 -> today's (`delta_A` -> `selective_delta_A`, ...).
_LEGACY_NAMES = {
    name.removeprefix(SelectiveModel.prefix): name
    for name in (*SelectiveLayer.adapter_layer_names, *SelectiveLayer.protected_buffer_names)
}


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the adapter tensors of a peft-selective 0.1.0 checkpoint (`...gate_proj.delta_A`) to today's names
    (`...gate_proj.selective_delta_A`). Checkpoint keys carry no adapter name, so the tensor name is the last part;
    every other key is returned unchanged."""

    def rename(key: str) -> str:
        module, _, name = key.rpartition(".")
        if not module or name not in _LEGACY_NAMES or f"{module}.{_LEGACY_NAMES[name]}" in state_dict:
            return key
        return f"{module}.{_LEGACY_NAMES[name]}"

    return {rename(key): value for key, value in state_dict.items()}


def _is_excluded(module_name: str, config: SelectiveConfig) -> bool:
    """`exclude_modules` matching as PEFT does it for modules: a full-match regex, or a set of names / suffixes."""
    exclude = config.exclude_modules
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module_name) is not None
    return any(module_name == key or module_name.endswith(f".{key}") for key in exclude)


class SelectiveMLPModel(SelectiveModel):
    """Tuner of [`SelectiveMLPConfig`] (Gate&Up)."""


class SAProjModel(SelectiveModel):
    """Tuner of [`SAProjConfig`] (self-attention projections)."""


__all__ = ["SAProjConfig", "SAProjModel", "SelectiveMLPConfig", "SelectiveMLPModel", "SelectiveModel"]
