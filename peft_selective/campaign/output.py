"""What a campaign program prints: the `continual-dpo` command's output settings, shared with the examples."""

from __future__ import annotations

import logging

import datasets
import transformers

from ..utils.warnings import quiet_known_warnings, release_held_back


__all__ = ["configure_output"]


def configure_output(verbose: bool = False) -> None:
    """Set what the program prints. Default: warnings, the campaign's own steps (INFO of `peft_selective.campaign`),
    one progress bar per long step (those of datasets' maps and of weight loading are off), no known-irrelevant
    third-party warning (`peft_selective.utils.warnings`). `verbose`: every log line (DEBUG for `peft_selective`, the
    Trainer's per-step metrics included), every bar, nothing filtered, and the notices held back at import."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("peft_selective").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    logging.getLogger("peft_selective.campaign").setLevel(logging.NOTSET if verbose else logging.INFO)
    if verbose:
        release_held_back()
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        return
    quiet_known_warnings()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
