"""GeometryProjected: selective updates constrained away from the protected data's input subspace.

Built on the selective package (its config, tuner and layer; never the other way round): the projection and norm
cap are the layer variant `variant.ProjectedVariant`. Importing this package registers that variant and the PEFT
method `geometry_projected`, as PEFT's own tuners register themselves in their `__init__.py`.
"""

from ...registration import register_method
from ..selective.layer import register_variant
from .calibration import GuaranteeReport, LayerGuarantee, calibrate, measure_guarantees, report_from_model
from .config import GeometryProjectedConfig
from .model import GeometryProjectedModel
from .variant import ProjectedVariant, ProtectedStats


register_variant(ProjectedVariant.name, ProjectedVariant)
register_method("geometry_projected", GeometryProjectedConfig, GeometryProjectedModel)


__all__ = [
    "GeometryProjectedConfig",
    "GeometryProjectedModel",
    "GuaranteeReport",
    "LayerGuarantee",
    "ProjectedVariant",
    "ProtectedStats",
    "calibrate",
    "measure_guarantees",
    "report_from_model",
]
