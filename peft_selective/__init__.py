"""peft-selective: PEFT methods that learn new data without forgetting what the model knew.

Importing this package registers its methods with PEFT (`get_peft_model(model, SelectiveMLPConfig())` then just
works): each tuner package registers its own when imported, as PEFT's tuners do (see `peft_selective.registration`).
`register()` is kept for compatibility and is harmless to call. Once the package is installed, a start-up hook also
imports it as soon as any program imports `peft`, so plain PEFT code can load saved adapters (see
`_peft_selective_autoload.py`).

The package is in wings whose imports run one way (`tests/test_package_structure.py` checks it):

- `peft_selective` (this module), `tuners`, `registration`, `targets`, `quantization`, `retention`, `utils`: the
  PEFT methods; needs only torch, transformers and peft;
- `peft_selective.continual` (extra `[trl]`): `ContinualDPOTrainer`, monthly continual DPO on TRL;
- `peft_selective.evaluation`: behavioural evaluation (learning, bleed, knowledge, intervals);
- `peft_selective.campaign` (extra `[campaign]`): the monthly campaign and the `continual-dpo` command;
- `peft_selective.demo` (extra `[demo]`): the bundled SmolLM2 model and synthetic months.
"""

from .utils.warnings import hold_back_import_notices


hold_back_import_notices()  # before PEFT imports bitsandbytes: its kernel notice is irrelevant here (utils.warnings)

from .registration import register  # noqa: E402
from .tuners.geometry import (  # noqa: E402
    GeometryProjectedConfig,
    GeometryProjectedModel,
    GuaranteeReport,
    calibrate,
    measure_guarantees,
    report_from_model,
)
from .tuners.selective import (  # noqa: E402
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
