"""The resolved config as rows of the `hparams` table, and back.

`hparam_rows` flattens a nested config to dotted keys with exact string values and their
type (the sink and the importers write it); `parse_hparam` turns one stored value back into
the typed value (`Store.hparams`, replay). The two are one format read and written by both
sides of the store, so they sit in the shared audit layer, apart from the sink.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from k2repro.audit.redact import REDACTED


def hparam_rows(hparams: Mapping[str, Any]) -> dict[str, list]:
    """Flatten a (nested) config to dotted keys with exact string values and their type."""
    keys: list[str] = []
    values: list[str | None] = []
    types: list[str] = []

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, key + ".")
                continue
            keys.append(key)
            if v is None:
                values.append(None)
                types.append("null")
            elif isinstance(v, bool):
                values.append("true" if v else "false")
                types.append("bool")
            elif isinstance(v, int):
                values.append(str(v))
                types.append("int")
            elif isinstance(v, float):
                values.append(repr(v))  # shortest exact round-trip form
                types.append("float")
            elif isinstance(v, str):
                values.append(v)
                types.append("str")
            elif isinstance(v, Mapping):
                values.append("{}")
                types.append("dict")
            elif isinstance(v, list | tuple):
                values.append(json.dumps(list(v), default=str))
                types.append("list")
            else:
                values.append(str(v))
                types.append(type(v).__name__)

    walk(hparams, "")
    return {"key": keys, "value": values, "value_type": types}


def parse_hparam(value: str | None, value_type: str) -> Any:
    """Inverse of hparam_rows for one value (exact for floats)."""
    if value is None or value_type == "null":
        return None
    if value_type == "str" or value == REDACTED:  # a redacted number stays the marker
        return value
    if value_type == "bool":
        return value == "true"
    if value_type == "int":
        return int(value)
    if value_type == "float":
        return float(value)
    if value_type in ("list", "dict"):
        return json.loads(value)
    return value


__all__ = ["hparam_rows", "parse_hparam"]
