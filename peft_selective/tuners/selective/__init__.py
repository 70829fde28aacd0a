"""The selective PEFT methods: one delta layer and tuner, several presets (config subclasses)."""

from __future__ import annotations

from typing import NamedTuple

from .config import SAProjConfig, SelectiveConfig, SelectiveMLPConfig
from .layer import Linear, ParamWrapper, SelectiveLayer
from .model import SAProjModel, SelectiveMLPModel, SelectiveModel


class Method(NamedTuple):
    """A PEFT method as registered: its lower-case name (PeftType member = name.upper()) and classes."""

    name: str
    config_cls: type
    model_cls: type


def methods() -> list[Method]:
    """Every PEFT method of the package (imported lazily: GeometryProjected builds on this module)."""
    from ..geometry import GeometryProjectedConfig, GeometryProjectedModel

    return [
        Method("selective_mlp", SelectiveMLPConfig, SelectiveMLPModel),
        Method("saproj", SAProjConfig, SAProjModel),
        Method("geometry_projected", GeometryProjectedConfig, GeometryProjectedModel),
    ]


__all__ = [
    "methods",
    "Linear",
    "Method",
    "ParamWrapper",
    "SAProjConfig",
    "SAProjModel",
    "SelectiveConfig",
    "SelectiveLayer",
    "SelectiveMLPConfig",
    "SelectiveMLPModel",
    "SelectiveModel",
]
