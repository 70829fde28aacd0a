"""peft-selective: PEFT methods that learn new data without forgetting what the model knew.

Importing this package registers its methods with PEFT (`get_peft_model(model, SelectiveMLPConfig())` then just
works). Once the package is installed, a start-up hook also registers them as soon as any program imports `peft`, so
plain PEFT code can load saved adapters (see `peft_selective._autoload`).
"""

from .registration import register
from .tuners.geometry import (
    GeometryProjectedConfig,
    GeometryProjectedModel,
    GuaranteeReport,
    calibrate,
    measure_guarantees,
    report_from_model,
)
from .tuners.selective import (
    SAProjConfig,
    SAProjModel,
    SelectiveConfig,
    SelectiveMLPConfig,
    SelectiveMLPModel,
)


register()

__version__ = "0.1.0"

__all__ = [
    "GeometryProjectedConfig",
    "GeometryProjectedModel",
    "GuaranteeReport",
    "calibrate",
    "measure_guarantees",
    "report_from_model",
    "SAProjConfig",
    "SAProjModel",
    "SelectiveConfig",
    "SelectiveMLPConfig",
    "SelectiveMLPModel",
    "register",
]
