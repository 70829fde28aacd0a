"""Tuner of GeometryProjected: the selective tuner, restricted to linear layers (the projection acts on a layer's
input space; fused 3-D expert parameters are left out)."""

from __future__ import annotations

import warnings

from ..selective.model import SelectiveModel
from .config import GeometryProjectedConfig


class GeometryProjectedModel(SelectiveModel):
    """Tuner of [`GeometryProjectedConfig`]. Calibrate with `peft_selective.calibrate` before training. Its layers are
    the selective ones, so it keeps the `selective_` prefix of [`SelectiveModel`]."""

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
