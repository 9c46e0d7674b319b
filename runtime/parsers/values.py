"""Typing a tool-call parameter: MiniMax-M2 writes every value as bare text (`<parameter name="days">3</parameter>`),
so the JSON type comes from the request's schema for that parameter.

The rules follow vLLM's minimax_m2 parser: the schema's `type` (a name or a list), `enum` values, and
`anyOf`/`oneOf`/`allOf` give a set of allowed types, tried in the order integer, number, boolean, object, array,
string, on the value with surrounding whitespace stripped; a value that fits none is read as JSON, or else kept
as the string. Two differences, both so that a value the model meant arrives unchanged:
- "null"/"none"/"nil" become None unless the schema allows only strings, where the word is the value (an enum
  such as ["none", "all"], a name);
- a string keeps its whitespace apart from one newline at each end (`<parameter name="p">\nvalue\n</parameter>`
  frames the value with newlines): vLLM strips it, which breaks code and diffs whose first line is indented.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

NULL_WORDS = frozenset({"null", "none", "nil"})
_TYPE_ORDER = ("integer", "number", "boolean", "object", "array", "string")
_ALIASES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "text": "string", "dict": "object",
            "list": "array"}
_INTEGER = re.compile(r"[-+]?\d+")
_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})
_ENUM_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"))


def unframe(raw: str) -> str:
    """The text between `<parameter ...>` and `</parameter>` without one framing newline at each end."""
    return raw.removeprefix("\n").removesuffix("\n")


def schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows (empty when it says nothing usable)."""
    if not isinstance(schema, dict):
        return set()
    types: set[str] = set()
    declared = schema.get("type")
    for name in declared if isinstance(declared, list) else [declared]:
        if isinstance(name, str):
            types.add(_ALIASES.get(name.lower(), name.lower()))
    enum = schema.get("enum")
    for item in enum if isinstance(enum, list) else []:
        types.add(_json_type_of(item))
    for key in ("anyOf", "oneOf", "allOf"):
        choices = schema.get(key)
        for choice in choices if isinstance(choices, list) else []:
            types |= schema_types(choice)
    return types


def typed_value(text: str, schema: Any) -> Any:
    """The JSON value of a parameter written as `text` (unframed), typed by its JSON schema (or None)."""
    types = schema_types(schema)
    stripped = text.strip()
    if stripped.lower() in NULL_WORDS and types != {"string"}:
        return None
    for name in _TYPE_ORDER:
        if name in types:
            converted = text if name == "string" else _convert(stripped, name)
            if converted is not _NO_MATCH:
                return converted
    as_json = _json_or_no_match(stripped)
    return text if as_json is _NO_MATCH else as_json


_NO_MATCH = object()


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    return next((name for cls, name in _ENUM_TYPES if isinstance(value, cls)), "string")


def _convert(raw: str, type_name: str) -> Any:
    if type_name == "integer":
        return int(raw) if _INTEGER.fullmatch(raw) else _NO_MATCH
    if type_name == "number":
        if _INTEGER.fullmatch(raw):
            return int(raw)
        try:
            number = float(raw)
        except ValueError:
            return _NO_MATCH
        return number if math.isfinite(number) else _NO_MATCH  # JSON has no inf/nan
    if type_name == "boolean":
        word = raw.lower()
        return True if word in _TRUE else False if word in _FALSE else _NO_MATCH
    value = _json_or_no_match(raw)
    wanted = dict if type_name == "object" else list
    return value if isinstance(value, wanted) else _NO_MATCH


def _json_or_no_match(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError):
        return _NO_MATCH


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON; json.dumps would write them back out as invalid JSON.
    raise ValueError(name)
