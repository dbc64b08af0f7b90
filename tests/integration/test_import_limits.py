"""Issue 24 #11/#12, importers: values beyond what a store column holds, nesting beyond what a
JSON reader follows, cells beyond what the CSV reader takes, steps beyond int64, and four
identical imports started together. Each bad input exits 2 with one line naming the file and
the line (or the step), shows no traceback and no 200 kB cell, and writes nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from k2repro.cli.main import main
from tests.conftest import k2
from tests.integration.import_fixtures import write_generic_csv, write_tb_file

LONG = "y" * 200_000
CASES = [  # (file name, content, line, words)
    ("tok_big.csv", "step,loss,tokens\n1,2.0,5\n2,1.9,1e300\n", 3, "tokens 1e+300 is not a whole number"),
    ("tok_inf.csv", "step,loss,tokens\n1,2.0,inf\n", 2, "tokens inf is not a whole number"),
    ("tok_big.jsonl", '{"step":1,"loss":2.0,"tokens":1e300}\n', 1, "tokens 1e+300"),
    ("time_nan.csv", "step,loss,time\n1,2.0,nan\n", 2, "time nan is not a time"),
    ("time_inf.csv", "step,loss,time\n1,2.0,1700000000\n2,1.9,inf\n", 3, "time inf is not a time"),
    ("time_big.csv", "step,loss,time\n1,2.0,1e300\n", 2, "time 1e+300 is not a time"),
    ("time_neg.csv", "step,loss,time\n1,2.0,-1e15\n", 2, "is not a time"),
    ("time_nan.jsonl", '{"step":1,"loss":2.0,"time":NaN}\n', 1, "time nan is not a time"),
    ("time_inf.jsonl", '{"step":1,"loss":2.0,"time":1700000000}\n{"step":2,"loss":2.0,"time":Infinity}\n', 2,
     "time inf is not a time"),
    ("time_big.jsonl", '{"step":1,"loss":2.0,"time":1e300}\n', 1, "time 1e+300 is not a time"),
    ("time_neg.jsonl", '{"step":1,"loss":2.0,"time":-1e15}\n', 1, "is not a time"),
    ("time_str.jsonl", '{"step":1,"loss":2.0,"time":"not a date"}\n', 1, "time 'not a date' is not a time"),
    ("time_str.csv", "step,loss,time\n1,2.0,not a date\n", 2, "'not a date'"),
    ("deep_list.jsonl", '{"step":1,"loss":' + "[" * 200_000 + "\n", 1, "nested too deeply"),
    ("deep_obj.jsonl", '{"step":1,"loss":2,"x":' + '{"a":' * 5000 + "1" + "}" * 5001 + "\n", 1, "nested too deeply"),
    ("bigstep.csv", "step,loss\n1,2.0\n9223372036854775808,1.9\n", 3, "too large (steps are 64-bit"),
    ("bigstep.jsonl", '{"step":1,"loss":2}\n{"step":1e19,"loss":2}\n', 2, "too large (steps are 64-bit"),
    ("longnum.csv", f"step,loss\n1,{LONG[:100_000]}\n", 2, "(100,000 characters) is not a number"),
    ("longnum2.csv", f"step,loss\n1,{LONG}\n", 2, "longer than 131,072 characters"),
    ("longtext.csv", f"step,loss,note\n1,2.0,{LONG}\n2,1.0,ok\n", 2, "longer than 131,072 characters"),
]


@pytest.mark.parametrize(("fname", "content", "line", "words"), CASES, ids=[c[0] for c in CASES])
def test_values_beyond_the_columns_exit_2_naming_the_line(tmp_path: Path, capsys, fname: str, content: str,
                                                          line: int, words: str) -> None:
    src = tmp_path / fname
    src.write_text(content)
    store = tmp_path / "store"
    capsys.readouterr()
    rc = main(["import", "csv", str(src), "--store", str(store)])
    err = capsys.readouterr().err
    assert rc == 2, err[:500]
    assert err.count("\n") == 1 and err.startswith(f"k2repro import: error: {src}:{line}: ") and words in err, err[:500]
    assert len(err) < 400 and "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize("wall", [math.inf, math.nan, 1e300])
def test_tensorboard_wall_time_beyond_the_column_exits_2(tmp_path: Path, capsys, wall: float) -> None:
    write_tb_file(tmp_path / "tb" / "events.out.tfevents.1.h", {"loss": {1: 2.0, 2: 1.0}}, wall0=wall)
    store = tmp_path / "store"
    capsys.readouterr()
    rc = main(["import", "tensorboard", str(tmp_path / "tb"), "--store", str(store)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "tb") in err and "is not a time" in err, err
    assert not store.exists()


def test_four_identical_imports_started_together_make_one_run(tmp_path: Path) -> None:
    src = tmp_path / "m.csv"
    write_generic_csv(src, n=50)
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "k2repro", "import", "csv", str(src), "--store", str(store),
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    created = [r["created"] for o in outs for r in json.loads(o[0])["runs"]]
    assert sorted(created) == [False, False, False, True]
    r = k2("sql", "SELECT count(*) AS n FROM runs", "--store", str(store), "--json")
    assert json.loads(r.stdout) == [{"n": 1}]


def test_a_store_path_with_glob_characters_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Issue 24 #9: `--store 'dir[1]'` imported (rc 0) and then every query failed."""
    src = tmp_path / "m.csv"
    write_generic_csv(src, n=10)
    store = tmp_path / "dir[1]"
    r = k2("import", "csv", str(src), "--store", str(store))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "glob characters" in r.stderr and "Traceback" not in r.stderr and not store.exists()
    q = k2("sql", "SELECT count(*) FROM steps", "--store", str(store))
    assert q.returncode == 2 and "glob characters" in q.stderr and len(q.stderr.strip().splitlines()) == 1
