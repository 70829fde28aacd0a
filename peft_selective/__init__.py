"""peft-selective: PEFT methods that learn new data without forgetting what the model knew.

Importing this package registers its methods with PEFT (`get_peft_model(model, SelectiveMLPConfig())` then just
works): each tuner package registers its own when imported, as PEFT's tuners do (see `peft_selective.registration`).
`register()` is kept for compatibility and is harmless to call. Once the package is installed, a start-up hook also
imports it as soon as any program imports `peft`, so plain PEFT code can load saved adapters (see
`_peft_selective_autoload.py`).
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
