"""Deprecated import name, kept for one release: `trl_ext` moved into the one package `peft_selective`.

| was | now |
|---|---|
| `trl_ext` (trainer, config, buffer, Fisher, anchors) | `peft_selective.continual` |
| `trl_ext.campaign`, `.cli`, `.hub`, `.model_card` | `peft_selective.campaign` |
| `trl_ext.metrics`, `.evaluation` | `peft_selective.evaluation.preference`, `.suites` |
| `trl_ext.data` | `peft_selective.demo.months` |

Importing `trl_ext` (or any `trl_ext.<module>`) warns once and gives the new modules under the old names.
"""

import importlib
import sys
import warnings


_MOVED = {
    "_io": "peft_selective.utils.io",
    "anchors": "peft_selective.continual.anchors",
    "campaign": "peft_selective.campaign.campaign",
    "cli": "peft_selective.campaign.cli",
    "continual_dpo_config": "peft_selective.continual.config",
    "continual_dpo_trainer": "peft_selective.continual.trainer",
    "data": "peft_selective.demo.months",
    "evaluation": "peft_selective.evaluation.suites",
    "ewc": "peft_selective.continual.ewc",
    "health": "peft_selective.continual.health",
    "hub": "peft_selective.campaign.hub",
    "metrics": "peft_selective.evaluation.preference",
    "model_card": "peft_selective.campaign.model_card",
    "reference": "peft_selective.continual.reference",
    "rehearsal": "peft_selective.continual.rehearsal",
    "validation": "peft_selective.continual.preference_data",
}

warnings.warn(
    "`trl_ext` is deprecated and will be removed in the next release: import from `peft_selective.continual` "
    "(trainer, config, rehearsal buffer), `peft_selective.campaign` (the monthly campaign), "
    "`peft_selective.evaluation` or `peft_selective.demo` instead.",
    FutureWarning,
    stacklevel=2,
)

for _old, _new in _MOVED.items():
    _module = importlib.import_module(_new)
    sys.modules[f"{__name__}.{_old}"] = _module
    globals()[_old] = _module

from peft_selective.continual import *  # noqa: E402, F403
from peft_selective.continual import __all__  # noqa: E402, F401
