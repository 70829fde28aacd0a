"""The monthly campaign: one directory per model, a month at a time (`continual-dpo init / run-month / eval /
report / push`), with its evaluations, model cards and Hub uploads.

Needs the `[campaign]` extra (`pip install "peft-selective[campaign]"`).
"""

from .campaign import Campaign, CampaignConfig, CampaignError, format_report, month_time_split
from .output import configure_output


__all__ = ["Campaign", "CampaignConfig", "CampaignError", "configure_output", "format_report", "month_time_split"]
