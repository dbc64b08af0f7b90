"""k2repro/logs.py: diagnostics through logging, rank-aware, configured at the edge."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SNIPPET = ("import logging; from k2repro.logs import configure; configure('k2repro x'); "
           "logging.getLogger('k2repro.audit.store').warning('w'); logging.getLogger('k2repro.y').info('i'); "
           "logging.getLogger('k2repro.z').error('e')")


def _run(env: dict[str, str]) -> str:
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith(("K2REPRO_LOG", "RANK", "WORLD_SIZE"))}
    r = subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO, env={**e, **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_warnings_reach_stderr_with_the_program_and_module() -> None:
    err = _run({})
    assert "k2repro x: warning: w\n" in err
    assert "info" not in err and "k2repro x: error: e\n" in err


def test_the_level_is_the_users_and_other_ranks_only_show_errors() -> None:
    assert "k2repro x: info: i\n" in _run({"K2REPRO_LOG_LEVEL": "info"})
    assert "k2repro x: debug:" not in _run({"K2REPRO_LOG_LEVEL": "debug"})  # nothing logged at debug
    rank1 = _run({"RANK": "1", "WORLD_SIZE": "2"})
    assert "warning" not in rank1 and "k2repro x rank 1: error: e" in rank1
    assert "k2repro x rank 1: warning: w" in _run({"RANK": "1", "WORLD_SIZE": "2", "K2REPRO_LOG_ALL_RANKS": "1"})
