"""GeometryProjected: selective updates constrained away from the protected data's input subspace."""

from .calibration import GuaranteeReport, LayerGuarantee, calibrate, measure_guarantees, report_from_model
from .config import GeometryProjectedConfig
from .model import GeometryProjectedModel


__all__ = [
    "GeometryProjectedConfig",
    "GeometryProjectedModel",
    "GuaranteeReport",
    "LayerGuarantee",
    "calibrate",
    "measure_guarantees",
    "report_from_model",
]
