"""Checks a month declares for the behaviour it teaches: a regex, a JSON schema, or a function of the generation.

A check is built from a small spec (JSON-able, so it can live in a campaign's month config):

| spec | passes when |
|---|---|
| `{"regex": "^\\\\+\\\\d", "flags": "i"}` | `re.search` finds the pattern in the generation |
| `{"json_schema": {"type": "object", "required": ["currency"]}}` | the whole generation parses as JSON matching it |
| `{"callable": "my_package.checks:is_phone_number"}` | the function returns `True` for the generation |

Every spec may add `"name"` (the key of the result in reports) and `"negate": true` (pass when the test fails, e.g.
"no apology"). The JSON-schema support is a small subset implemented here, so results never depend on which optional
packages are installed: `type` (a name or a list of names), `properties`, `required`, `items`, `enum` and
`additionalProperties` (a boolean). Other keywords are rejected when the check is built rather than silently ignored.

```python
check = Check.from_spec({"regex": r"^\\+\\d", "name": "phone"})
check("+33 1 42 68 53 00")  # True
```
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from .text import parse_json, response_text


__all__ = ["Check", "validate_json_schema"]

_KINDS = ("regex", "json_schema", "callable")
_OPTIONS = ("name", "negate", "flags")
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}

# ---------------------------------------------------------------------------------------------------------------------
# JSON schema subset
# ---------------------------------------------------------------------------------------------------------------------

_SCHEMA_KEYWORDS = frozenset({"type", "properties", "required", "items", "enum", "additionalProperties"})
# Annotations that do not constrain anything: accepted and ignored.
_ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "examples", "default", "$comment"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _schema_problem(schema: Any, path: str) -> Optional[str]:
    """The first problem of a schema for the supported subset, or None."""
    if not isinstance(schema, Mapping):
        return f"{path} must be an object (a dict), got {type(schema).__name__}"
    unknown = sorted(set(schema) - _SCHEMA_KEYWORDS - _ANNOTATIONS)
    if unknown:
        return (
            f"{path} uses unsupported keyword(s) {unknown}; the supported subset is {sorted(_SCHEMA_KEYWORDS)} "
            "(use a `callable` check for anything else)"
        )
    types = schema.get("type")
    for name in [types] if isinstance(types, str) else (types or []):
        if name not in _TYPES:
            return f"{path}.type has unknown type {name!r}; choose from {list(_TYPES)}"
    if "required" in schema and not (
        isinstance(schema["required"], list) and all(isinstance(key, str) for key in schema["required"])
    ):
        return f"{path}.required must be a list of property names"
    if "enum" in schema and not isinstance(schema["enum"], list):
        return f"{path}.enum must be a list of allowed values"
    if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool):
        return f"{path}.additionalProperties must be true or false in the supported subset"
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return f"{path}.properties must map property names to schemas"
    for key, sub_schema in properties.items():
        problem = _schema_problem(sub_schema, f"{path}.properties.{key}")
        if problem:
            return problem
    if "items" in schema:
        return _schema_problem(schema["items"], f"{path}.items")
    return None


def _has_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # JSON booleans are not numbers
        return False
    if name == "integer":
        return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    return True  # number


def validate_json_schema(value: Any, schema: Mapping) -> bool:
    """Whether a parsed JSON value matches a schema of the supported subset (see the module docstring).

    Args:
        value: a value as `json.loads` returns it.
        schema (`dict`): the schema.

    Returns:
        `bool`
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_has_type(value, name) for name in names):
            return False
    if "enum" in schema and not any(value == option and type(value) is type(option) for option in schema["enum"]):
        return False
    if isinstance(value, dict):
        if any(key not in value for key in schema.get("required", ())):
            return False
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                if not validate_json_schema(item, properties[key]):
                    return False
            elif schema.get("additionalProperties", True) is False:
                return False
    if isinstance(value, list) and "items" in schema:
        return all(validate_json_schema(item, schema["items"]) for item in value)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def _compile_flags(flags: Any) -> int:
    if flags is None:
        return 0
    if isinstance(flags, int) and not isinstance(flags, bool):
        return flags
    if isinstance(flags, str):
        unknown = sorted(set(flags) - set(_FLAGS))
        if unknown:
            raise ValueError(f"Unknown regex flag letters {unknown} in {flags!r}; use letters of {''.join(_FLAGS)}.")
        value = 0
        for letter in flags:
            value |= _FLAGS[letter]
        return value
    raise ValueError(f'`flags` must be a string of letters such as "im" (ignore case, multiline), got {flags!r}.')


def _import_callable(target: str) -> Callable[[str], Any]:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f'A callable check needs "module:function" (e.g. "my_package.checks:is_phone_number"), got {target!r}.'
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"Cannot import module {module_name!r} for the callable check {target!r} ({error}). Make it importable "
            "from the evaluating process (installed, or on PYTHONPATH)."
        ) from error
    function: Any = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"Module {module_name!r} has no attribute {attribute!r} (callable check {target!r}).")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{target!r} is not callable: a callable check needs a function of the generation text.")
    return function


@dataclass
class Check:
    """A declared test of a generation's behaviour; call it on a generation to get a `bool`.

    Build it with [`Check.from_spec`]; see the module docstring for the spec format.

    Args:
        name (`str`): name of the check in results.
        kind (`str`): `"regex"`, `"json_schema"` or `"callable"`.
        target: the pattern (`str`), the schema (`dict`), or the function / its `"module:function"` path.
        flags (`str`, *optional*): regex flag letters (`i`, `m`, `s`, `x`, `a`); regex checks only.
        negate (`bool`, defaults to `False`): pass when the test fails.
    """

    name: str
    kind: str
    target: Any
    flags: Optional[str] = None
    negate: bool = False
    _test: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "regex":
            if not isinstance(self.target, str):
                raise ValueError(f"A regex check needs a pattern string, got {type(self.target).__name__}.")
            try:
                pattern = re.compile(self.target, _compile_flags(self.flags))
            except re.error as error:
                raise ValueError(f"Invalid regex {self.target!r} in check {self.name!r}: {error}.") from error
            self._test = lambda text: pattern.search(text) is not None
            return
        if self.flags is not None:
            raise ValueError(f"`flags` only applies to regex checks (check {self.name!r} is {self.kind}).")
        if self.kind == "json_schema":
            problem = _schema_problem(self.target, "json_schema")
            if problem:
                raise ValueError(f"Check {self.name!r}: {problem}.")
            schema = self.target

            def test(text: str) -> bool:
                parsed, value = parse_json(text)
                return parsed and validate_json_schema(value, schema)

            self._test = test
        elif self.kind == "callable":
            function = _import_callable(self.target) if isinstance(self.target, str) else self.target
            if not callable(function):
                raise ValueError(f"A callable check needs a function or a 'module:function' path, got {function!r}.")

            def test(text: str) -> bool:
                result = function(text)
                # A score (0.3) or a None would silently read as True / False: insist on a boolean.
                if type(result).__name__ not in ("bool", "bool_"):
                    raise TypeError(
                        f"Callable check {self.name!r} must return a bool, got {type(result).__name__} ({result!r})."
                    )
                return bool(result)

            self._test = test
        else:
            raise ValueError(f"Unknown check kind {self.kind!r}; choose from {list(_KINDS)}.")

    @classmethod
    def from_spec(cls, spec: Any) -> Check:
        """Build a check from its spec; a `Check` is returned as is.

        Args:
            spec (`dict` or `Check`): exactly one of `regex`, `json_schema`, `callable`, plus optional `name`,
                `negate` and (regex only) `flags`.

        Returns:
            [`Check`]

        Raises:
            `ValueError`: on an unknown key, no or several kinds, a bad regex, an unsupported schema, or a callable
                that cannot be imported; the message says what to change.
        """
        if isinstance(spec, Check):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(
                f'A check spec is a dict such as {{"regex": "^\\\\+\\\\d"}}, got {type(spec).__name__}: {spec!r}.'
            )
        unknown = sorted(set(spec) - set(_KINDS) - set(_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in check spec {spec!r}; a spec has one of {list(_KINDS)} and optionally "
                f"{list(_OPTIONS)}."
            )
        kinds = [kind for kind in _KINDS if kind in spec]
        if len(kinds) != 1:
            raise ValueError(
                f"A check spec needs exactly one of {list(_KINDS)}, got {kinds or 'none'} in {spec!r}; declare "
                "several checks as several specs."
            )
        kind = kinds[0]
        negate = spec.get("negate", False)
        if not isinstance(negate, bool):
            raise ValueError(f"`negate` must be true or false, got {negate!r}.")
        name = spec.get("name")
        if name is None:
            target = spec[kind]
            label = target if isinstance(target, str) else getattr(target, "__name__", "schema")
            name = f"{'not ' if negate else ''}{kind}:{label}"
        return cls(name=str(name), kind=kind, target=spec[kind], flags=spec.get("flags"), negate=negate)

    def to_spec(self) -> dict:
        """The spec this check was built from (JSON-able unless it wraps a Python function object)."""
        spec = {self.kind: self.target, "name": self.name}
        if self.flags is not None:
            spec["flags"] = self.flags
        if self.negate:
            spec["negate"] = True
        return spec

    def __call__(self, generation: Any) -> bool:
        """Whether the generation (a string, or messages: the last assistant content is checked) passes."""
        return self._test(response_text(generation)) != self.negate

    def matches(self, generation: Any) -> bool:
        """Same as calling the check; the name [`StyleSignature`] uses, so both serve as style tests."""
        return self(generation)
