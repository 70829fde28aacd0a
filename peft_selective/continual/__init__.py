"""Continual DPO: [`ContinualDPOTrainer`], a TRL `DPOTrainer` that trains one month at a time and keeps what the
earlier months taught (rehearsal scored against each pair's own month, a KL to the previous model on anchor prompts,
EWC, an SFT term, boundary pairs), with its config, rehearsal buffer, Fisher store and preference-row schema.

Needs the `[trl]` extra (`pip install "peft-selective[trl]"`).
"""

from .anchors import AnchorSet, anchor_kl, general_anchor_prompts, shape_variant_prompts
from .config import RECOMMENDED_RETENTION, ContinualDPOConfig
from .ewc import FisherState, estimate_fisher, ewc_penalty
from .health import ModelHealthError
from .preference_data import PreferenceDataError, check_preference_row, validate_preference_dataset
from .reference import PreviousMonthReference, active_adapters
from .rehearsal import RehearsalBuffer, RehearsalBufferError
from .trainer import ContinualDPOTrainer


__all__ = [
    "RECOMMENDED_RETENTION",
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
    "check_preference_row",
    "estimate_fisher",
    "ewc_penalty",
    "general_anchor_prompts",
    "shape_variant_prompts",
    "validate_preference_dataset",
]
