"""The PEFT tuner of the selective methods: resolves the preset's targets and swaps in the delta layers."""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...quantization import keep_4bit_layers_trainable
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

    prefix: str = "selective_"
    tuner_layer_cls = SelectiveLayer
    # Targets come from the model's structure (`targets.resolve_targets`), not from a model_type table.
    target_module_mapping: dict[str, list[str]] = {}

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
        if parameter_name is not None:
            if isinstance(target, ParamWrapper) and target.parameter_name == parameter_name:
                target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
                return
            new_module = ParamWrapper(target, adapter_name, peft_config, parameter_name=parameter_name)
        elif isinstance(target, Linear):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not is_linear_like(base):
                raise TypeError(
                    f"Target module {current_key!r} is a {type(base).__name__}; peft-selective adapts torch.nn.Linear "
                    "(including bitsandbytes Linear4bit / Linear8bitLt) and transformers' Conv1D. Remove it from "
                    "`target_modules` or add it to `exclude_modules`."
                )
            new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated, as in PEFT
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


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

    prefix: str = "selective_mlp_"


class SAProjModel(SelectiveModel):
    """Tuner of [`SAProjConfig`] (self-attention projections)."""

    prefix: str = "saproj_"


__all__ = ["SAProjConfig", "SAProjModel", "SelectiveMLPConfig", "SelectiveMLPModel", "SelectiveModel"]
