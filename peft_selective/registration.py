"""How a peft-selective method is registered with PEFT: the mechanism only, no method is named here.

Each tuner package registers its own methods when it is imported, as PEFT's tuners do in their `__init__.py`
(`tuners/selective/__init__.py`: selective_mlp and saproj; `tuners/geometry/__init__.py`: geometry_projected).
Importing `peft_selective` imports both, so importing the package registers everything; the start-up hook
`_peft_selective_autoload` does that as soon as a program imports `peft`.

PEFT keeps its method types in the closed enum `peft.utils.peft_types.PeftType`, and `register_peft_method` refuses a
name that is not already a member. transformers' PEFT integration also calls `.value` on `peft_type`, so a plain
string would not do: `register_method` adds a real enum member, idempotently, and then goes through PEFT's own
`register_peft_method` so that every mapping PEFT consults (config, tuner, prefix) is filled.

This module imports nothing from the package, so every tuner can import it without an import cycle.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method


#: The parameter prefix shared by every method of the package: all of them use the selective delta layer, whose
#: adapter tensors are all named `selective_*` (as LoRA and AdaLoRA share `lora_`).
PREFIX = "selective_"


def extend_peft_type(name: str) -> PeftType:
    """Add `name` to PEFT's `PeftType` enum (no-op if it is already there) and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    # EnumType.__setattr__ refuses to rebind member names, so bypass it for this one new attribute.
    type.__setattr__(PeftType, name, member)
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str = PREFIX) -> None:
    """Register the PEFT method `name` (lower case; its `PeftType` member is `name.upper()`) with PEFT.

    Idempotent: registering the same config class again (a module imported twice, e.g. under another name) is a
    no-op. Called by each tuner package's `__init__.py` after importing its classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = extend_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def register() -> None:
    """Kept for compatibility; calling it is harmless and does nothing more.

    The methods are registered when their tuner packages are imported, and importing `peft_selective` (which any
    import of this module does first) imports them all."""
