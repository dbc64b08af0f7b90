"""Issue 24 #7: credentials are caught by their VALUE, under names that say nothing (a DB URL
with a password, a token in a Slack job comment, an `sk-` key in a run tag): planted in the
environment, argv, a config value, a tag, an exception message and a git diff, none survives in
any decoded value of the store, any byte of its other files, a report or a CLI error. Random
looking values that are not credentials (sha256 sums, batch hashes, commit and run ids) stay."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from k2repro.audit.redact import scrub_text
from k2repro.audit.store import open_store
from tests.conftest import dirty_repo, k2
from tests.integration.planted import (
    ANTHROPIC,
    AWS,
    DB_PW,
    GH,
    GITLAB,
    HF,
    JWT,
    KEY_BODY,
    OPENAI,
    PLANTED,
    PRIVATE,
    SLACK,
    scan,
)

SHA = hashlib.sha256(b"x").hexdigest()
COMMIT = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"

CHILD = textwrap.dedent("""
    import sys
    from k2repro.audit.facts import capture_facts, git_diff_text
    from k2repro.audit.sink import AuditSink

    store, tag, gl, slack, jwt, aws, sha, commit = sys.argv[1:9]
    hparams = {"run": {"name": "sv", "tags": {"note": tag}},
               "data": {"source": "https://reader:" + sys.argv[9] + "@data.example/x", "sha": sha},
               "code": {"commit": commit}}
    with AuditSink(store, "sv-run") as sink:
        sink.start({"name": "sv"}, hparams, capture_facts(0, 1), [{"artifact": "a", "path": "p", "sha256": sha}],
                   git_diff=git_diff_text())
        sink.log_steps({"step": [1], "loss": [1.0], "batch_hash": [sha]})
        sink.log_event("note", step=1, detail={"msg": "pushed with " + gl, "commit": commit})
        raise RuntimeError("upload failed: " + slack + " " + jwt + " " + aws)
""")


def test_planted_credentials_are_found_by_value_everywhere(tmp_path: Path) -> None:
    repo = dirty_repo(tmp_path / "repo", "train.py",
                      f"x = 1\nHUB = '{HF}'\nCI = '{GITLAB}'\nKEYFILE = '''{PRIVATE}'''\n")
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", K2REPRO_DB_URL=f"postgres://admin:{DB_PW}@db/x",
               SLURM_JOB_COMMENT=f"token={GH}")
    res = subprocess.run([sys.executable, "-c", CHILD, str(store), OPENAI, GITLAB, SLACK, JWT, AWS, SHA, COMMIT,
                          DB_PW, f"+run.tags.extra={ANTHROPIC}"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "RuntimeError" in res.stderr  # the child failed as planned

    report = k2("report", "sv-run", "--store", str(store), "--out", str(tmp_path / "reports"))
    with open_store(store) as st:
        strings: list[str] = []
        for view in st.tables():
            cols = [r[0] for r in st.execute("SELECT column_name FROM information_schema.columns WHERE "
                                             "table_name = ? AND data_type = 'VARCHAR'", [view]).fetchall()]
            for col in cols:
                strings += [r[0] for r in st.execute(f'SELECT "{col}" FROM "{view}" WHERE "{col}" IS NOT NULL')
                            .fetchall()]
        text = "\n".join(strings)
        assert len(strings) > 50
        for secret in PLANTED:
            assert secret not in text, f"{secret} in the store"
        # what was planted did reach the store, redacted, and the look-alikes stayed intact
        assert "***REDACTED***" in text and "upload failed" in text and "x = 1" in text
        assert SHA in text and COMMIT in text and "sv-run" in text
        assert st.execute("SELECT batch_hash FROM steps").fetchone()[0] == SHA
    files = [p for base in (store, tmp_path / "reports") if base.exists() for p in base.rglob("*") if p.is_file()]
    assert report.returncode == 0 and any(p.suffix in (".md", ".html") for p in files), report.stderr
    # and the run's bundle (env.json, config.yaml, tables, the git diff, the model card)
    bundle = tmp_path / "bundle"
    e = k2("export", "sv-run", "--store", str(store), "--out", str(bundle), "--no-data", "--reports",
           str(tmp_path / "reports"))
    assert e.returncode == 0, e.stderr[-2000:]
    assert (bundle / "env.json").is_file() and list(bundle.rglob("*.parquet"))
    assert scan(store, tmp_path / "reports", bundle) == []  # every byte, and every Parquet decoded
    # an error message names what it was given, through the same scrubber
    bad = k2("sql", f"SELECT * FROM no_such_table_{GH}", "--store", str(store))
    assert bad.returncode == 2 and GH not in bad.stderr and "REDACTED" in bad.stderr


def test_scrub_text_catches_each_format_and_keeps_look_alikes() -> None:
    for secret in PLANTED[1:-1]:  # a bare password or key body is no format: caught in its URL / block
        assert secret not in scrub_text(f"x {secret} y"), secret
    assert "-----BEGIN" not in scrub_text(PRIVATE) and KEY_BODY not in scrub_text(f"k = {PRIVATE!r}")
    assert scrub_text(f"postgres://admin:{DB_PW}@db/x") == "postgres://admin:***REDACTED***@db/x"
    keep = f"sha256 {SHA} commit {COMMIT} run sv-run-20240101-abcdef https://github.com/o/r 0xdeadbeef"
    assert scrub_text(keep) == keep
