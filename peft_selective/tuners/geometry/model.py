"""Tuner of GeometryProjected: the selective tuner, restricted to linear layers (the projection acts on a layer's
input space; fused 3-D expert parameters are left out)."""

from __future__ import annotations

import warnings

from ..selective.model import SelectiveModel
from .config import GeometryProjectedConfig


class GeometryProjectedModel(SelectiveModel):
    """Tuner of [`GeometryProjectedConfig`]. Calibrate with `peft_selective.calibrate` before training. Its layers are
    the selective ones, so it keeps the `selective_` prefix of [`SelectiveModel`]."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """As [`SelectiveModel`]'s, and: an adapter saved before `protected_dims` existed gets it filled from the
        checkpoint's buffer shapes (PEFT's loaders size the buffers with a pre-hook anyway), so that saving it again
        writes a config that transformers' loaders can use."""
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if isinstance(config, GeometryProjectedConfig) and not config.protected_dims:
            suffix = f".selective_protected_basis.{adapter_name}"
            dims = {
                key.removesuffix(suffix).removeprefix("base_model.model."): int(value.shape[-1])
                for key, value in state_dict.items()
                if key.endswith(suffix) and value.dim() == 2
            }
            if dims:
                config.protected_dims = dict(sorted(dims.items()))
        return state_dict

    def _prepare_adapter_config(self, peft_config: GeometryProjectedConfig, model_config: dict):
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.target_parameters:
            warnings.warn(
                "GeometryProjected protects linear layers only; the fused MoE expert parameters "
                f"{peft_config.target_parameters[:2]}... are left frozen.",
                UserWarning,
                stacklevel=2,
            )
            peft_config.target_parameters = None
        return peft_config
