"""Register the peft-selective methods with PEFT.

PEFT keeps its method types in the closed enum `peft.utils.peft_types.PeftType`, and
`register_peft_method` refuses a name that is not already a member. transformers' PEFT integration also calls
`.value` on `peft_type`, so a plain string would not do: we add real enum members, idempotently, and then go
through PEFT's own `register_peft_method` so that every mapping PEFT consults (config, tuner, prefix) is filled.
"""

from __future__ import annotations

import threading

from peft.utils.peft_types import PeftType, register_peft_method


_lock = threading.Lock()
_registered = False


def _extend_peft_type(name: str) -> PeftType:
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


def register() -> None:
    """Register SELECTIVE_MLP, SAPROJ and GEOMETRY_PROJECTED with PEFT. Safe to call any number of times."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        from .tuners.selective import methods

        for method in methods():
            peft_type = _extend_peft_type(method.name.upper())
            if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is method.config_cls:
                continue
            # All three share the layer, hence its parameter prefix `selective_` (PEFT's default would be the name).
            register_peft_method(
                name=method.name,
                config_cls=method.config_cls,
                model_cls=method.model_cls,
                prefix=method.model_cls.prefix,
            )
        _registered = True
