"""Secret redaction: by name, and by value wherever a secret value appears.

Two rules, applied by the sink to everything it writes so that callers cannot forget:
1. A value whose name looks like a credential (a word part KEY, TOKEN, SECRET, PASSWORD,
   PASSWD, CREDENTIAL, AUTH, PRIVATE, ...) is replaced by REDACTED. Word parts, not substrings:
   `HF_TOKEN`, `api_token`, `apiKey` are secrets; `max_tokens`, `n_tokens`, `tokenizer`,
   `text_field`, `author` are not.
2. Every such value (at least MIN_SECRET_LEN characters), collected from the environment and
   the config, is scrubbed wherever it appears inside any other string: env, hparams, argv,
   git diff, tracebacks, event details.
3. By value, whatever its name (`scrub_text`): credentials in the formats of common providers
   and URLs with user:password, found by Yelp's `detect-secrets` provider plugins (GitHub,
   AWS, Slack, GitLab, JWT, private keys, basic-auth URLs, OpenAI, PyPI), plus the formats
   detect-secrets 1.5 lacks (Hugging Face `hf_...`, fine-grained GitHub `github_pat_...`,
   `sk-...` keys without OpenAI's marker, such as `sk-proj-` and Anthropic's `sk-ant-`), and
   whole private-key blocks. No entropy plugin: sha256 sums, batch hashes, commit and run ids
   look random and must stay intact. `write_segment` applies it to every string column of
   every segment; reports, bundles and CLI error messages go through it too.
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


# ----------------------------------------------------------------------------- by value

#: A cheap first pass (RE2, vectorised by Arrow; also Python `re`): a string that matches none
#: of these holds none of the formats below, so the detectors run on few strings.
PREFILTER = (r"gh[pousr]_|github_pat_|hf_|sk-|pypi-|A3T|ABIA|ACCA|AKIA|ASIA|(?i:aws)|xox|hooks\.slack"
             r"|glpat-|gldt-|glft-|glsoat-|glrt-|GR1348941|glcbt-|glimt-|glptt-|glagent-|eyJ|PRIVATE KEY"
             r"|://[^/\s@]*:[^/\s@]*@")
_PREFILTER = re.compile(PREFILTER)
#: Formats detect-secrets 1.5 has no plugin for (see the module docstring).
_EXTRA = re.compile(r"\bhf_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{22,}|\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}")
_KEY_BLOCK = re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[A-Z ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
                        re.S)
_PLUGINS: list[Any] | None = None
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.+/=")


def _plugins() -> list[Any]:
    """The provider-format plugins of detect-secrets (built once)."""
    global _PLUGINS
    if _PLUGINS is None:
        from detect_secrets.plugins.aws import AWSKeyDetector
        from detect_secrets.plugins.basic_auth import BasicAuthDetector
        from detect_secrets.plugins.github_token import GitHubTokenDetector
        from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
        from detect_secrets.plugins.jwt import JwtTokenDetector
        from detect_secrets.plugins.openai import OpenAIDetector
        from detect_secrets.plugins.private_key import PrivateKeyDetector
        from detect_secrets.plugins.pypi_token import PypiTokenDetector
        from detect_secrets.plugins.slack import SlackDetector

        _PLUGINS = [c() for c in (AWSKeyDetector, BasicAuthDetector, GitHubTokenDetector, GitLabTokenDetector,
                                  JwtTokenDetector, OpenAIDetector, PrivateKeyDetector, PypiTokenDetector,
                                  SlackDetector)]
    return _PLUGINS


def find_secrets(text: str) -> list[str]:
    """Credential values in `text` by their format, longest first."""
    if not text or not _PREFILTER.search(text):
        return []
    found: set[str] = set()
    for plugin in _plugins():
        if plugin.secret_type == "Private Key":
            continue  # the whole block: scrub_text
        password_only = plugin.secret_type == "Basic Auth Credentials"
        for rx in plugin.denylist:  # the plugins' own patterns; the whole match, not its group
            for m in rx.finditer(text):
                if password_only:
                    found.add(m.group(1))
                    continue
                end = m.end()
                while end < len(text) and text[end] in _TOKEN_CHARS:  # a lazy JWT tail, a longer token
                    end += 1
                found.add(text[m.start():end])
    found.update(m.group(0) for m in _EXTRA.finditer(text))
    found = {v for v in found if len(v) >= 4}
    return sorted(found, key=len, reverse=True)


def scrub_text(text: str) -> str:
    """Replace every credential found by its value (`find_secrets`, whole private-key blocks)
    with REDACTED. The one by-value scrubber of everything k2repro writes."""
    if not isinstance(text, str) or not text or not _PREFILTER.search(text):
        return text
    if "PRIVATE KEY" in text:
        text = _KEY_BLOCK.sub(REDACTED, text)
    for v in find_secrets(text):
        text = text.replace(v, REDACTED)
    return text


#: strings already seen to match no prefilter pattern (run ids, parameter names, hashes come
#: back every flush): the writer's hot path then costs a set lookup per distinct value
_CLEAN: set[str] = set()
_CLEAN_MAX = 1 << 16


def _candidate(value: str | None) -> bool:
    """Whether `value` may hold a credential (the prefilter matches); remembers clean ones."""
    if value is None or value in _CLEAN:
        return False
    if _PREFILTER.search(value):
        return True
    if len(_CLEAN) >= _CLEAN_MAX:
        _CLEAN.clear()
    _CLEAN.add(value)
    return False


def scrub_column(arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """`scrub_text` over a string column: Arrow's RE2 prefilter picks the few candidate
    strings, Python scrubs only those."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(arr) == 0 or arr.null_count == len(arr):
        return arr
    if not any(_candidate(v) for v in pc.unique(arr).to_pylist()):
        return arr  # the usual case: no distinct value can hold a credential
    hit = pc.match_substring_regex(arr, PREFILTER)
    if not pc.any(hit).as_py():
        return arr
    values = arr.to_pylist()
    mask = hit.to_pylist()
    out = [scrub_text(v) if m else v for v, m in zip(values, mask, strict=True)]
    return pa.array(out, type=arr.type)


def scrub_table(tbl: pa.Table) -> pa.Table:
    """`scrub_column` over every string column of a table."""
    import pyarrow as pa

    for i, f in enumerate(tbl.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            col = tbl.column(i)
            new = scrub_column(col)
            if new is not col:
                tbl = tbl.set_column(i, f, new)
    return tbl


def scrub_obj(obj: Any) -> Any:
    """`scrub_text` over every string (keys too) of a JSON-like object."""
    if isinstance(obj, Mapping):
        return {scrub_obj(k) if isinstance(k, str) else k: scrub_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_obj(x) for x in obj]
    return scrub_text(obj) if isinstance(obj, str) else obj


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
            elif isinstance(v, str):  # a credential by format (a URL's password): scrubbed wherever else it shows
                self.add(*find_secrets(v))

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
        """Replace every known secret value inside `text`, then every credential by format."""
        if not text:
            return text
        for s in self._ordered:
            if s in text:
                text = text.replace(s, REDACTED)
        return scrub_text(text)

    def scrub_array(self, arr: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """Vectorised `scrub` over a string column."""
        import pyarrow.compute as pc

        for s in self._ordered:
            if pc.any(pc.match_substring(arr, s)).as_py():
                arr = pc.replace_substring(arr, pattern=s, replacement=REDACTED)
        return scrub_column(arr)

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
