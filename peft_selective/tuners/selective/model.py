"""The PEFT tuner of the selective methods: resolves the preset's targets and swaps in the delta layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

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
            peft_config.target_parameters = resolved.parameters or None
        return peft_config

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


class SelectiveMLPModel(SelectiveModel):
    """Tuner of [`SelectiveMLPConfig`] (Gate&Up)."""

    prefix: str = "selective_mlp_"


class SAProjModel(SelectiveModel):
    """Tuner of [`SAProjConfig`] (self-attention projections)."""

    prefix: str = "saproj_"


__all__ = ["SAProjConfig", "SAProjModel", "SelectiveMLPConfig", "SelectiveMLPModel", "SelectiveModel"]
