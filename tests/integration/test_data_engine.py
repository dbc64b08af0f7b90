"""The data stages on datatrove's executors (issue 22): at equal data.tasks the outputs are
byte-identical whatever the number of workers and whatever the executor, local processes or
a real Ray cluster; bad input inside a worker still ends as one line with no output."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k2repro.data.engine import EXECUTION, Engine
from k2repro.data.prepare import prepare
from k2repro.errors import BadInputError

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "dedup", "tokenize", "pack")
SLICE = ("data.source=../corpus", "data.max_docs=150", "data.tasks=2")
NETNS = Path(__file__).with_name("ray_in_netns.py")


def digests(root: Path) -> dict[str, str]:
    """sha256 of every output file but execution.json (how it ran, not what it made)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != EXECUTION}


def _chain(cwd: Path, *overrides: str) -> None:
    """The four stages through the CLI's own entry, in this process (workers come from its fork server)."""
    from k2repro.cli.data import run_raw

    old = os.getcwd()
    os.chdir(cwd)
    try:
        for stage in STAGES:
            assert run_raw([stage, "--config-name", "pipeline", "data.work_dir=w", "data.packed_dir=w/packed",
                            *SLICE, *overrides]) == 0
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> tuple[Path, dict[int, dict[str, str]]]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("engine")
    (root / "corpus").mkdir()
    for f in ("code.jsonl.gz", "prose.jsonl.gz"):
        shutil.copy(REPO / "data" / "sample" / f, root / "corpus" / f)
    prev = os.environ.get("K2REPRO_CONF")
    os.environ["K2REPRO_CONF"] = str(REPO / "conf")
    runs = {}
    try:
        for w in (1, 2):
            (root / f"local{w}").mkdir()
            _chain(root / f"local{w}", f"data.workers={w}")
            runs[w] = digests(root / f"local{w}" / "w")
    finally:
        if prev is None:
            os.environ.pop("K2REPRO_CONF", None)
        else:
            os.environ["K2REPRO_CONF"] = prev
    return root, runs


def test_workers_change_no_output_byte(local_runs) -> None:  # noqa: ANN001
    root, runs = local_runs
    assert runs[1] == runs[2]
    assert {"prepared/train/00000.jsonl.gz", "prepared/train/00001.jsonl.gz", "dedup/val/00001.jsonl.gz",
            "dedup/report.json", "tokenizer/tokenizer.json", "packed/train.bin", "packed/manifest.json"} <= set(runs[1])
    for w in (1, 2):  # gzip members carry no name and mtime 0; execution.json says how it ran
        head = (root / f"local{w}" / "w" / "prepared" / "train" / "00000.jsonl.gz").read_bytes()[:10]
        assert head[3] == 0 and head[4:8] == b"\0\0\0\0"
        ex = json.loads((root / f"local{w}" / "w" / "packed" / EXECUTION).read_text())
        assert [s["stage"] for s in ex["stages"]] == ["prepare", "dedup", "tokenize", "pack"]
        assert {s["workers"] for s in ex["stages"]} == {w} and {s["executor"] for s in ex["stages"]} == {"local"}
    with gzip.open(root / "local1" / "w" / "prepared" / "train" / "00001.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["doc_id"].startswith("prose:")  # task 1 read the second file


def _threads_after_encoding(out: str, tokenizer: str, engine: Engine) -> dict:  # noqa: ARG001 - CallStep's signature
    """In a task: the threads this process has before and after HF tokenizers encodes a batch
    (its rayon pool starts on that first parallel call), and the pool size it was given."""
    from k2repro.data.tokenizer import load_tokenizer

    before = len(os.listdir("/proc/self/task"))
    load_tokenizer(tokenizer).encode_batch_fast(["a few words to encode " * 50] * 64)
    rec = {"before": before, "after": len(os.listdir("/proc/self/task")),
           "env": os.environ.get("RAYON_NUM_THREADS"), "pid": os.getpid()}
    Path(out, f"{os.getpid()}.json").write_text(json.dumps(rec))
    return rec


def test_side_by_side_workers_share_the_cpus_between_their_thread_pools(local_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """Two workers on this machine's CPUs: each task's process starts its tokenizer thread pool
    with its share (CPUs // 2), not one thread per CPU (2 x CPUs threads in all), and not none
    (TOKENIZERS_PARALLELISM=false would leave a worker on a large machine one thread)."""
    from k2repro.data.engine import CallStep, cpu_count, run_pipeline, scratch_dir, thread_share

    if "RAYON_NUM_THREADS" in os.environ:
        pytest.fail("RAYON_NUM_THREADS is set in the test environment; unset it (a user's value wins by design)")
    root, _ = local_runs
    tok = str(root / "local1" / "w" / "tokenizer" / "tokenizer.json")
    (tmp_path / "probe").mkdir()
    engine = Engine(tasks=2, workers=2)
    with scratch_dir(tmp_path / "x") as sc:
        run_pipeline([CallStep(str(sc), _threads_after_encoding, (str(tmp_path / "probe"), tok), engine)], engine, 2, sc)
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "probe").glob("*.json"))]
    share = thread_share(2)
    assert share == max(1, cpu_count() // 2)
    assert len(recs) == 2 and len({r["pid"] for r in recs}) == 2 and os.getpid() not in {r["pid"] for r in recs}
    for r in recs:
        assert r["env"] == str(share)
        assert r["after"] - r["before"] == share, recs  # the pool's threads, started by the encoding


def test_bad_input_in_a_worker_is_one_error_and_no_output(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(BadInputError, match=r"b.jsonl:2: no text field 'text'"):
        prepare(tmp_path / "c", tmp_path / "out", engine=Engine(tasks=2, workers=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no output, no temp or scratch folder


def test_engine_keys_are_checked_with_their_names() -> None:
    from k2repro.errors import ConfigError

    with pytest.raises(ConfigError, match="data.executor"):
        Engine(executor="spark").checked()
    with pytest.raises(ConfigError, match="data.ray_address"):
        Engine(executor="ray").checked()
    with pytest.raises(ConfigError, match="data.tasks"):
        Engine(tasks=0).checked()
    with pytest.raises(ConfigError, match="data.workers"):
        Engine(workers=0).checked()


def _netns_or_fail() -> None:
    """The Ray test needs an unprivileged user + network namespace; fail (never skip) naming
    the fix when this machine refuses one."""
    r = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("cannot create a private network namespace for the Ray cluster (`unshare -rn` said: "
                    f"{r.stderr.strip()}); allow unprivileged user namespaces: "
                    "`sudo sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000` "
                    "(and install iproute2 for `ip`)")


@pytest.mark.ray
def test_ray_cluster_gives_the_bytes_of_the_local_executor(local_runs) -> None:  # noqa: ANN001
    """A real Ray cluster (`ray start --head --num-cpus 2`) in a private network namespace that
    has only loopback: the stages run on it (2 tasks, 2 workers) and write the same bytes as the
    local executor with 1 and with 2 workers; every socket of the namespace is on loopback."""
    _netns_or_fail()
    root, runs = local_runs
    (root / "ray").mkdir()
    result = root / "ray_result.json"
    env = {**os.environ, "K2REPRO_CONF": str(REPO / "conf"), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
               [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = f'ip link set lo up && exec "{sys.executable}" "{NETNS}" w "{result}" -- ' + " ".join(
        [*SLICE, "data.workers=2"])
    r = subprocess.run(["unshare", "-rn", "sh", "-c", cmd], cwd=root / "ray", env=env, capture_output=True,
                       text=True, timeout=240)
    out = json.loads(result.read_text())
    assert r.returncode == 0, (out.get("error"), out["stages"], r.stderr[-2000:])
    assert [s["stage"] for s in out["stages"]] == list(STAGES) and all(s["rc"] == 0 for s in out["stages"])
    # no datatrove or Ray chatter; the one line Ray's C++ core prints when its probe for this
    # machine's own address (a UDP "connect" to 8.8.8.8, which sends nothing) finds no route
    chatter = [ln for s in out["stages"] for ln in s["stderr"].splitlines()
               if "Failed to determine local IP via external connectivity" not in ln]
    assert chatter == [], out["stages"]
    # the namespace has loopback only, and no socket had any other address
    assert [ln.split(":")[1].strip() for ln in out["links"].splitlines()] == ["lo"]
    loop = {"0100007F", "00000000", "00000000000000000000000000000000", "00000000000000000000000001000000",
            "0000000000000000FFFF00000100007F"}
    assert out["sockets"] and set(out["sockets"]) <= loop, out["sockets"]
    ex = json.loads((root / "ray" / "w" / "packed" / EXECUTION).read_text())
    assert {s["executor"] for s in ex["stages"]} == {"ray"}
    assert digests(root / "ray" / "w") == runs[1] == runs[2]


def test_store_data_manifest_records_inputs_stage_parameters_and_engine(local_runs, tmp_path: Path) -> None:
    """Lineage (issue 22, item 6): a run started on the packed folder writes, in the store's
    existing `data_manifest` columns, the corpus files (relative paths, sha256, bytes, reader)
    and, with the packed manifest's row, every stage's parameters, the executor, the worker
    count and datatrove's version."""
    import k2repro
    import k2repro.audit
    from k2repro.core.hashing import sha256_file
    from k2repro.data.engine import datatrove_version
    from k2repro.data.packed import PackedDataset

    root, _ = local_runs
    ds = PackedDataset(root / "local2" / "w" / "packed", "train")
    run = k2repro.audit.start(tmp_path / "store", name="lineage", data_manifest=ds.manifest_rows())
    run.close()
    rows = {r[0]: r[1:] for r in k2repro.open_store(tmp_path / "store").execute(
        "SELECT artifact, path, sha256, bytes, detail FROM data_manifest").fetchall()}
    path, sha, size, detail = rows["corpus/code.jsonl.gz"]
    assert path == "../../corpus/code.jsonl.gz" and sha == sha256_file(root / "corpus" / "code.jsonl.gz")
    assert size == (root / "corpus" / "code.jsonl.gz").stat().st_size
    assert json.loads(detail)["reader"] == "jsonl" and json.loads(detail)["fingerprint"] == "sha256"
    lineage = json.loads(rows["packed/manifest"][3])
    st = lineage["lineage"]
    assert st["prepare"]["inputs"] == ["../../../corpus"]  # relative to the prepared folder and st["prepare"]["max_docs"] == 150
    assert st["prepare"]["tasks"] == 2 and st["prepare"]["datatrove"] == datatrove_version()
    assert (st["dedup"]["num_perm"], st["dedup"]["threshold"]) == (128, 0.8)
    assert st["tokenize"]["vocab_size"] == 2048 and st["pack"]["seq_len"] == 128
    assert [(e["stage"], e["executor"], e["workers"]) for e in lineage["execution"]] == [
        ("prepare", "local", 2), ("dedup", "local", 2), ("tokenize", "local", 2), ("pack", "local", 2)]
