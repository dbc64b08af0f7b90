"""Planted secrets (env vars, a config value, the same value in an uncommitted git diff, argv, an
event detail and a traceback) appear in no value of any table, checked through SQL over every
string column (compressed Parquet hides bytes from grep) and in no byte of the other files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from k2repro.audit.redact import REDACTED
from k2repro.audit.store import open_store
from tests.conftest import dirty_repo

AWS = "AKIAplantedSECRETvalue0001"
HF = "hf_plantedTOKENvalue0002"
WANDB = "wandb-planted-key-0003"
API = "sk-planted-api-key-0004"
SECRETS = (AWS, HF, WANDB, API)

CHILD = textwrap.dedent("""
    import sys
    from k2repro.audit.facts import capture_facts, git_diff_text
    from k2repro.audit.sink import AuditSink

    store, api = sys.argv[1], sys.argv[2]
    hparams = {"run": {"name": "sec", "tags": {"api_key": api, "team": "x"}},
               "data": {"text_field": "text"}, "train": {"max_tokens": 4096, "tokenizer": "bpe"}}
    with AuditSink(store, "sec-run") as sink:
        sink.start({"name": "sec"}, hparams, capture_facts(0, 1), [{"artifact": "a", "path": "p"}],
                   git_diff=git_diff_text())
        sink.log_event("note", step=1, detail={"msg": "downloading with " + sys.argv[3]})
        sink.log_steps({"step": [1], "loss": [1.0], "batch_hash": ["h"]})
        raise RuntimeError("request failed: key=" + api + " aws=" + sys.argv[4])
""")


def test_planted_secrets_appear_nowhere(tmp_path):
    repo = dirty_repo(tmp_path / "repo", "train.py", f"x = 1\nAPI_KEY = '{API}'\n")  # the diff holds it
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", AWS_SECRET_ACCESS_KEY=AWS, HF_TOKEN=HF, WANDB_API_KEY=WANDB)
    res = subprocess.run([sys.executable, "-c", CHILD, str(store), API, HF, AWS, WANDB], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "RuntimeError" in res.stderr  # the child failed as planned

    with open_store(store) as st:
        views = [t for t in st.tables()]
        checked = 0
        for view in views:
            cols = [r[0] for r in st.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND "
                "data_type = 'VARCHAR'", [view]).fetchall()]
            for col in cols:
                for secret in SECRETS:
                    n = st.execute(f'SELECT count(*) FROM "{view}" WHERE contains("{col}", ?)',
                                   [secret]).fetchone()[0]
                    assert n == 0, f"{secret} found in {view}.{col}"
                    checked += 1
        assert checked > 100
        # the redactions are there, and non-secrets survived
        hp = st.hparams("sec-run")
        assert hp["run.tags.api_key"] == REDACTED
        assert hp["data.text_field"] == "text" and hp["train.max_tokens"] == 4096
        assert hp["train.tokenizer"] == "bpe" and hp["run.tags.team"] == "x"
        env_rows = st.env("sec-run")
        assert env_rows["env.HF_TOKEN"] == REDACTED and env_rows["env.AWS_SECRET_ACCESS_KEY"] == REDACTED
        assert env_rows["env.WANDB_API_KEY"] == REDACTED
        diff = st.events("sec-run", kind="git_diff")["detail"].iloc[0]
        assert "+API_KEY = '***REDACTED***'" in diff
        run = st.run("sec-run")
        assert run["status"] == "failed" and "RuntimeError: request failed: key=***REDACTED***" in run["error"]
        assert REDACTED in run["argv"]
        assert st.steps("sec-run")["step"].tolist() == [1]
    for path in store.rglob("*"):  # every other file (heartbeats, markers, the DuckDB file)
        if path.is_file() and path.suffix != ".parquet":
            data = path.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), path
