"""The selective PEFT methods: one delta layer and tuner, several presets (config subclasses).

Importing this package registers its methods with PEFT (`selective_mlp`, `saproj`), as PEFT's own tuners register
themselves in their `__init__.py`. GeometryProjected builds on this package (`..geometry`), never the other way round:
its behaviour on the shared layer is a variant (`layer.SelectiveVariant`) that it registers itself.
"""

from __future__ import annotations

from ...registration import register_method
from .config import SAProjConfig, SelectiveConfig, SelectiveMLPConfig
from .layer import Linear, ParamWrapper, SelectiveLayer, SelectiveVariant, register_variant
from .model import SAProjModel, SelectiveMLPModel, SelectiveModel


register_method("selective_mlp", SelectiveMLPConfig, SelectiveMLPModel)
register_method("saproj", SAProjConfig, SAProjModel)


__all__ = [
    "Linear",
    "ParamWrapper",
    "SAProjConfig",
    "SAProjModel",
    "SelectiveConfig",
    "SelectiveLayer",
    "SelectiveMLPConfig",
    "SelectiveMLPModel",
    "SelectiveModel",
    "SelectiveVariant",
    "register_variant",
]
