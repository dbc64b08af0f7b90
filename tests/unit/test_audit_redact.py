"""Redaction: credential names by word part, secret values scrubbed everywhere."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from k2repro.audit.redact import REDACTED, Redactor, is_secret_name


@pytest.mark.parametrize("name", [
    "HF_TOKEN", "api_token", "TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "run.tags.api_key",
    "apiKey", "APIKey", "db_password", "PGPASSWORD", "GOOGLE_APPLICATION_CREDENTIALS", "auth",
    "private_key_path", "secrets.aws", "hfAuthToken",
])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "tokens", "max_tokens", "n_tokens", "train.max_tokens", "tokenizer", "tokenizer_path",
    "data.text_field", "maxTokens", "author", "monkey", "keys", "PWD", "tokens_per_s", "keyboard",
])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_values_collected_from_env_and_config_and_scrubbed_everywhere():
    env = {"HF_TOKEN": "hf_abcdefgh", "HOME": "/home/x", "SHORT_KEY": "abc"}
    r = Redactor.from_env(env)
    r.add_from_mapping({"run": {"tags": {"api_key": "sk-123456789"}}, "data": {"text_field": "text"}})
    assert set(r.secrets) >= {"hf_abcdefgh", "sk-123456789"}
    assert "abc" not in r.secrets and "/home/x" not in r.secrets  # too short / not secret
    assert r.scrub("curl -H 'x: hf_abcdefgh' sk-123456789") == f"curl -H 'x: {REDACTED}' {REDACTED}"
    arr = r.scrub_array(pa.array(["a hf_abcdefgh b", None, "clean"]))
    assert arr.to_pylist() == [f"a {REDACTED} b", None, "clean"]


def test_json_escaped_secret_and_nested_objects():
    r = Redactor(['pa"ss\\word!'])
    detail = json.dumps({"msg": 'login with pa"ss\\word! failed'})
    assert 'pa\\"ss' not in r.scrub(detail) and REDACTED in r.scrub(detail)
    obj = r.redact_obj({"password": "x", "nested": {"apiKey": 1, "max_tokens": 7, "note": 'pa"ss\\word!'}})
    assert obj == {"password": REDACTED, "nested": {"apiKey": REDACTED, "max_tokens": 7, "note": REDACTED}}


def test_longest_secret_wins():
    r = Redactor(["abcdef", "abcdefghij"])
    assert r.scrub("xx abcdefghij yy") == f"xx {REDACTED} yy"


def test_model_vocabulary_is_not_a_secret() -> None:
    from k2repro.audit.redact import is_secret_name

    for name in ("bos_token_id", "model.pad_token_id", "num_key_value_heads", "token_type_ids"):
        assert not is_secret_name(name), name
    for name in ("HF_TOKEN", "run.tags.api_key", "key_value_token", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_name(name), name
