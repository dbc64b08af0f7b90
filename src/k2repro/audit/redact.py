"""Secret redaction: by name, and by value wherever a secret value appears.

Two rules, applied by the sink to everything it writes so that callers cannot forget:
1. A value whose name looks like a credential (a word part KEY, TOKEN, SECRET, PASSWORD,
   PASSWD, CREDENTIAL, AUTH, PRIVATE, ...) is replaced by REDACTED. Word parts, not substrings:
   `HF_TOKEN`, `api_token`, `apiKey` are secrets; `max_tokens`, `n_tokens`, `tokenizer`,
   `text_field`, `author` are not.
2. Every such value (at least MIN_SECRET_LEN characters), collected from the environment and
   the config, is scrubbed wherever it appears inside any other string: env, hparams, argv,
   git diff, tracebacks, event details.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

REDACTED = "***REDACTED***"
MIN_SECRET_LEN = 6

# Whole word parts that mark a credential. Compound forms cover camelCase-free spellings
# such as APIKEY or SECRETKEY.
_SECRET_PARTS = frozenset({
    "KEY", "TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE",
    "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH", "AUTHORIZATION", "PRIVATE", "APIKEY",
    "ACCESSKEY", "SECRETKEY", "PRIVATEKEY", "AUTHTOKEN", "ACCESSTOKEN", "APITOKEN",
})
# Glued spellings such as PGPASSWORD: a part that ends with one of these is a secret too
# (not KEY or TOKEN: monkey, hotkey, subtoken are ordinary words).
_SECRET_SUFFIXES = ("PASSWORD", "PASSWD", "SECRET", "APIKEY", "CREDENTIALS")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SPLIT = re.compile(r"[^A-Za-z0-9]+")


def name_parts(name: str) -> list[str]:
    """`WANDB_API_KEY` -> [WANDB, API, KEY]; `run.tags.apiKey` -> [RUN, TAGS, API, KEY]."""
    return [p.upper() for p in _SPLIT.split(_CAMEL.sub(r"\1_\2", name)) if p]


# KEY / TOKEN followed by one of these is model vocabulary, not a credential: bos_token_id,
# pad_token_id, num_key_value_heads, token_type_ids.
_BENIGN_AFTER = frozenset({"ID", "IDS", "VALUE", "VALUES", "TYPE", "TYPES", "COUNT", "LEN", "LENGTH",
                           "INDEX", "EMBEDDING", "EMBEDDINGS", "DIM", "SIZE", "PROJ", "NORM"})


def is_secret_name(name: str) -> bool:
    """True when any word part of the (dotted) name marks a credential."""
    parts = name_parts(name)
    for i, p in enumerate(parts):
        if p in ("KEY", "TOKEN") and i + 1 < len(parts) and parts[i + 1] in _BENIGN_AFTER:
            continue
        if p in _SECRET_PARTS or p.endswith(_SECRET_SUFFIXES):
            return True
    return False


class Redactor:
    """Holds the secret values of a run and scrubs them from strings and Arrow arrays."""

    def __init__(self, secrets: Iterable[str] = (), min_len: int = MIN_SECRET_LEN) -> None:
        self.min_len = min_len
        self._values: set[str] = set()
        self._ordered: list[str] = []
        self.add(*secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, secrets: Iterable[str] = ()) -> Redactor:
        """A redactor that knows every secret-named environment variable's value."""
        r = cls(secrets)
        r.add_from_mapping(os.environ if environ is None else environ)
        return r

    def add(self, *values: Any) -> None:
        """Register secret values (too short or non-string values are ignored)."""
        changed = False
        for v in values:
            if not isinstance(v, str) or len(v) < self.min_len:
                continue
            # Also the JSON-escaped spelling, so a secret inside a JSON detail is found.
            for form in (v, json.dumps(v)[1:-1]):
                if form not in self._values and len(form) >= self.min_len:
                    self._values.add(form)
                    changed = True
        if changed:
            # Longest first: a secret that contains another is replaced whole.
            self._ordered = sorted(self._values, key=len, reverse=True)

    def add_from_mapping(self, mapping: Mapping[str, Any], prefix: str = "") -> None:
        """Collect values under secret names from a (nested) mapping: env vars or a config."""
        for k, v in mapping.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                if is_secret_name(str(k)):
                    self._add_all_leaves(v)
                else:
                    self.add_from_mapping(v, key + ".")
            elif is_secret_name(key):
                self._add_leaf(v)

    def _add_all_leaves(self, v: Any) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                self._add_all_leaves(x)
        else:
            self._add_leaf(v)

    def _add_leaf(self, v: Any) -> None:
        if isinstance(v, list | tuple):
            for x in v:
                self._add_leaf(x)
        elif v is not None and not isinstance(v, bool):
            self.add(str(v))

    @property
    def secrets(self) -> list[str]:
        return list(self._ordered)

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def scrub(self, text: str) -> str:
        """Replace every known secret value inside `text`."""
        if not self._ordered or not text:
            return text
        for s in self._ordered:
            if s in text:
                text = text.replace(s, REDACTED)
        return text

    def scrub_array(self, arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """Vectorised `scrub` over a string column."""
        if not self._ordered:
            return arr
        import pyarrow.compute as pc

        for s in self._ordered:
            if pc.any(pc.match_substring(arr, s)).as_py():
                arr = pc.replace_substring(arr, pattern=s, replacement=REDACTED)
        return arr

    def redact_value(self, name: str, value: Any) -> Any:
        """Name rule first, then scrubbing of strings."""
        if is_secret_name(name) and value is not None:
            return REDACTED
        return self.scrub(value) if isinstance(value, str) else value

    def redact_obj(self, obj: Any, name: str = "") -> Any:
        """Recursively redact a JSON-like object: secret-named keys and secret values."""
        if isinstance(obj, Mapping):
            out = {}
            for k, v in obj.items():
                ks = str(k)
                out[self.scrub(ks)] = REDACTED if is_secret_name(ks) and v is not None else self.redact_obj(v, ks)
            return out
        if isinstance(obj, list | tuple):
            return [self.redact_obj(x, name) for x in obj]
        if isinstance(obj, str):
            return self.scrub(obj)
        return obj
