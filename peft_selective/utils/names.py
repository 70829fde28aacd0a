"""The month-name rule, shared by the rehearsal buffer and the campaign: a month name becomes a folder or file name
(locally and in a Hub repository), so it is one plain path segment: a letter or digit, then up to 63 letters,
digits, `.`, `_` or `-`."""

from __future__ import annotations

import re


#: Longest month name.
MONTH_NAME_MAX_LENGTH = 64
#: The rule as a pattern without anchors, to embed in file-name patterns.
MONTH_NAME_BODY = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MONTH_NAME_MAX_LENGTH - 1}}}"
MONTH_NAME_PATTERN = re.compile(rf"^{MONTH_NAME_BODY}$")


def is_month_name(name: object) -> bool:
    """Whether `name` follows the month-name rule."""
    return isinstance(name, str) and MONTH_NAME_PATTERN.match(name) is not None


def check_month_name(name: object, where: str = "") -> str:
    """`name` if it follows the month-name rule, else `ValueError` saying the rule (`where`: e.g. " in campaign.json")."""
    if not is_month_name(name):
        raise ValueError(
            f"Invalid month name {name!r}{where}: use a letter or digit, then letters, digits, '.', '_' and '-', at "
            f"most {MONTH_NAME_MAX_LENGTH} characters in all (e.g. 2025-07)."
        )
    return name
