"""TRL extensions of peft-selective: continual DPO with rehearsal and retention penalties.

Importing it registers the PEFT methods of `peft_selective` too.
"""

import peft_selective  # noqa: F401

from .anchors import AnchorSet, anchor_kl, general_anchor_prompts, shape_variant_prompts
from .continual_dpo_config import ContinualDPOConfig
from .continual_dpo_trainer import ContinualDPOTrainer
from .ewc import FisherState, estimate_fisher, ewc_penalty
from .health import ModelHealthError
from .reference import PreviousMonthReference, active_adapters
from .rehearsal import RehearsalBuffer, RehearsalBufferError
from .validation import PreferenceDataError, validate_preference_dataset


__all__ = [
    "AnchorSet",
    "ContinualDPOConfig",
    "ContinualDPOTrainer",
    "FisherState",
    "ModelHealthError",
    "PreferenceDataError",
    "PreviousMonthReference",
    "RehearsalBuffer",
    "RehearsalBufferError",
    "active_adapters",
    "anchor_kl",
    "estimate_fisher",
    "ewc_penalty",
    "general_anchor_prompts",
    "shape_variant_prompts",
    "validate_preference_dataset",
]
