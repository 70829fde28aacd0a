"""The third-party warnings known to be irrelevant to peft-selective, silenced here and nowhere else.

Each is matched on its exact message (and its source: the logger, or the warning's category), so that any other
warning, from the same library included, still shows.

- bitsandbytes, at import (`bitsandbytes.backends.cpu.ops`, on CPUs with AVX512-BF16 and without the `kernels`
  package): "Failed to load CPU gemm_4bit_forward from kernels-community ...". That kernel only serves 4-bit weights
  repacked for the CPU, a repacking peft-selective switches off on every 4-bit layer it meets
  (`peft_selective.quantization.keep_4bit_layers_trainable`), so it is never used, in 4-bit or not. PEFT imports
  bitsandbytes whenever it is installed, so the notice would print on every run: `import peft_selective` holds it
  back ([`hold_back_import_notices`]); `continual-dpo --verbose` shows what was held back ([`release_held_back`]).
- transformers 5, from PEFT: "`is_gradient_checkpointing` is deprecated ... Use `is_activation_checkpointing`"
  (`PeftModel.__init__` reads the old property of every model it wraps; nothing of ours reads it).
- transformers 5, from TRL: "`gradient_checkpointing` is deprecated ... Use `activation_checkpointing`"
  (`DPOConfig` sets the old field by default; the campaign passes the new name, a `DPOConfig` built elsewhere may not).

The two transformers warnings are filtered by [`quiet_known_warnings`], which `continual-dpo` calls unless
`--verbose`; a library user decides for their own program.
"""

from __future__ import annotations

import logging
import re
import warnings


__all__ = [
    "BITSANDBYTES_KERNEL_NOTICE",
    "KNOWN_FUTURE_WARNINGS",
    "hold_back_import_notices",
    "quiet_known_warnings",
    "release_held_back",
]

#: (logger name, message regex) of the bitsandbytes notice printed when it is imported.
BITSANDBYTES_KERNEL_NOTICE = (
    "bitsandbytes.backends.cpu.ops",
    r"Failed to load CPU gemm_4bit_forward from kernels-community",
)
#: Message regexes (`warnings.filterwarnings` matches them at the start) of transformers' `FutureWarning`s that PEFT and
#: TRL trigger, not our code.
KNOWN_FUTURE_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use `is_activation_checkpointing` instead",
    r"`gradient_checkpointing` is deprecated and will be removed in v6\. Use `activation_checkpointing` instead",
)


class _HoldBack(logging.Filter):
    """Keeps the records whose message matches `pattern` instead of letting them through."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern.match(record.getMessage()):
            self.held.append(record)
            return False
        return True


def _hold_back_filter(create: bool = False) -> _HoldBack | None:
    name, pattern = BITSANDBYTES_KERNEL_NOTICE
    logger = logging.getLogger(name)
    found = next((f for f in logger.filters if isinstance(f, _HoldBack)), None)
    if found is None and create:
        found = _HoldBack(pattern)
        logger.addFilter(found)
    return found


def hold_back_import_notices() -> None:
    """Hold back the bitsandbytes notice (see the module docstring). Must run before bitsandbytes is imported (PEFT
    imports it): `peft_selective/__init__.py` calls it first. Idempotent."""
    _hold_back_filter(create=True)


def release_held_back() -> int:
    """Stop holding back and emit what was held (through its own logger's handlers); returns how many records."""
    found = _hold_back_filter()
    if found is None:
        return 0
    logger = logging.getLogger(BITSANDBYTES_KERNEL_NOTICE[0])
    logger.removeFilter(found)
    for record in found.held:
        logger.handle(record)
    return len(found.held)


def quiet_known_warnings() -> None:
    """Ignore exactly the transformers `FutureWarning`s of `KNOWN_FUTURE_WARNINGS` for the rest of the process."""
    for message in KNOWN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
