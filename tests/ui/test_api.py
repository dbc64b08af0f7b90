"""The UI's JSON API over a real server (`k2repro ui` on 127.0.0.1, real HTTP): every
endpoint answers, curves are min/max-downsampled in DuckDB (a one-step spike survives),
heatmaps aggregate server-side, the SQL page uses `k2repro sql`'s allow-list and sandbox with
a time and row limit, and the security cases: token on a non-loopback bind (401 on pages and
/api alike), loopback Host only without one, read-only (no method but GET), no file outside
the static folder (`..`, absolute paths, symlinks, encoded separators), and bad input as a
clear 4xx JSON message, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import k2
from tests.ui.serve import Server, free_port

SPIKE = 1200


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two synthetic runs (a spike at 1200, layer stats; a child resumed from step 1000), the
    spike rows from `k2repro forensics`, and eval rows."""
    from k2repro.audit.writer import append_table
    from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run

    root = tmp_path_factory.mktemp("uistore")
    write_run(root, SyntheticRun(run_id="alpha", n_steps=3000, seed=1, spikes=(InjectedSpike("bad_batch", SPIKE),)))
    write_run(root, SyntheticRun(run_id="beta", n_steps=3000, seed=2))
    f = k2("forensics", "alpha", "--store", str(root), "--out", str(root.parent / "rep"), "--no-html", "--json")
    assert f.returncode == 0, f.stderr[-2000:]
    append_table(root, "alpha", "evals", {
        "step": [1000, 2000, 3000, 1000, 2000, 3000], "metric": ["val/loss"] * 3 + ["val/ppl/prose"] * 3,
        "value": [3.1, 2.9, 2.8, 22.0, 18.2, 16.4], "n_tokens": [100] * 6})
    return root


@pytest.fixture(scope="module")
def srv(store: Path):
    s = Server(store)
    yield s
    s.stop()


def test_runs_lists_both_runs_with_status_and_last_loss(srv: Server) -> None:
    code, d = srv.json("/api/runs")
    assert code == 200
    by = {r["run_id"]: r for r in d["runs"]}
    assert set(by) == {"alpha", "beta"}
    assert by["alpha"]["status"] == "completed" and by["alpha"]["steps"] == 3000
    assert isinstance(by["alpha"]["last_loss"], float)


def test_run_has_hparams_columns_spikes_and_family(srv: Server) -> None:
    code, d = srv.json("/api/runs/alpha")
    assert code == 200
    assert "loss" in d["columns"] and d["has_layers"] and d["n_evals"] == 6
    assert any(abs(s["onset_step"] - SPIKE) <= 2 for s in d["spikes"]), d["spikes"]
    assert d["family"][0]["run_id"] == "alpha" and d["hparams"]


def test_curve_is_downsampled_min_max_and_keeps_the_spike(srv: Server) -> None:
    _, whole = srv.json("/api/runs/alpha/curve?raw=1")
    assert whole["n"] == 3000 and len(whole["step"]) == 3000 and not whole["downsampled"]
    _, d = srv.json("/api/runs/alpha/curve?points=100")
    assert d["downsampled"] and len(d["step"]) <= 100
    near = [i for i, st in enumerate(whole["step"]) if abs(st - SPIKE) <= 50]
    peak = max(near, key=lambda i: whole["y"][i])
    assert whole["step"][peak] in d["step"]  # the spike's peak (one step) is one of the 100 kept points
    assert max(d["y"]) == max(whole["y"])  # and so is the global maximum
    _, z = srv.json(f"/api/runs/alpha/curve?lo={SPIKE - 10}&hi={SPIKE + 10}&x=tokens")
    assert z["lo"] == SPIKE - 10 and z["hi"] == SPIKE + 10 and len(z["step"]) == 21
    assert all(t is not None for t in z["tokens"]) and z["tokens"] == sorted(z["tokens"])


def test_layers_heatmap_is_aggregated_on_the_server(srv: Server) -> None:
    code, d = srv.json("/api/runs/alpha/layers?col=update_ratio&buckets=30&agg=max")
    assert code == 200 and len(d["bucket_start"]) == 30 and d["params"]
    assert all(len(row) == 30 for row in d["z"])
    assert d["params"] == sorted(d["params"], key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def test_step_spikes_spike_and_evals(srv: Server) -> None:
    code, st = srv.json(f"/api/runs/alpha/steps/{SPIKE}")
    assert code == 200 and st["step"] == SPIKE and st["samples"] and st["prev_step"] == SPIKE - 1
    _, sp = srv.json("/api/runs/alpha/spikes")
    sid = next(s["spike_id"] for s in sp["spikes"] if abs(s["onset_step"] - SPIKE) <= 2)
    code, one = srv.json(f"/api/runs/alpha/spikes/{sid}")
    assert code == 200 and one["reason"] and isinstance(one["detail"], dict)
    code, ev = srv.json("/api/runs/alpha/evals")
    assert code == 200 and ev["series"]["val/ppl/prose"]["value"] == [22.0, 18.2, 16.4]


def test_compare_and_diff(srv: Server) -> None:
    code, d = srv.json("/api/compare?runs=alpha,beta&points=200")
    assert code == 200 and [c["run_id"] for c in d["curves"]] == ["alpha", "beta"]
    code, df = srv.json("/api/diff?a=alpha&b=beta")
    assert code == 200 and df["run_a"] == "alpha" and df["first_loss_divergence_step"] == 1


def test_sql_rows_csv_and_refusals(srv: Server) -> None:
    code, d = srv.json("/api/sql?q=" + _q("SELECT run_id, count(*) AS n FROM steps GROUP BY 1 ORDER BY 1"))
    assert code == 200 and d["rows"] == [["alpha", 3000], ["beta", 3000]]
    code, _, body = srv.get("/api/sql?format=csv&q=" + _q("SELECT 1 AS a, 'x' AS b"))
    assert code == 200 and body.decode().splitlines() == ["a,b", "1,x"]
    for bad, needle in (("COPY steps TO 'out.csv'", "COPY statements are not allowed"),
                        ("SELECT 1; SELECT 2", "one statement per call"),
                        ("ATTACH 'x.db'", "ATTACH statements are not allowed"),
                        ("SELECT * FROM read_text('/etc/passwd')", "SQL:"),
                        ("SELECT * FROM read_parquet('../../x.parquet')", "SQL:")):
        code, err = srv.json("/api/sql?q=" + _q(bad))
        assert code == 400 and needle in err["error"], (bad, err)
    code, d = srv.json("/api/sql?limit=100&q=" + _q("SELECT * FROM range(50000)"))
    assert code == 200 and len(d["rows"]) == 100 and d["truncated"] is True
    t0 = time.monotonic()
    code, err = srv.json("/api/sql?timeout=0.5&q=" + _q("SELECT count(*) FROM range(100000000000) a"))
    assert code == 408 and "longer than 0.5 s" in err["error"] and time.monotonic() - t0 < 8


@pytest.mark.parametrize("path, code", [
    ("/api/runs/nope", 404), ("/api/runs/alpha/curve?col=bogus", 400), ("/api/runs/alpha/curve?lo=x", 400),
    ("/api/runs/alpha/curve?points=0", 400), ("/api/runs/alpha/curve?lo=5000", 400),
    ("/api/runs/alpha/curve?col=metric:nope", 404), ("/api/runs/alpha/layers?col=loss", 400),
    ("/api/runs/alpha/layers?agg=median", 400), ("/api/runs/alpha/steps/99999", 404),
    ("/api/runs/alpha/steps/abc", 400), ("/api/runs/alpha/spikes/999", 404), ("/api/compare", 400),
    ("/api/diff?a=alpha", 400), ("/api/sql", 400), ("/api/sql?q=SELEC", 400), ("/api/nothing", 404),
    ("/api/runs/alpha/curve?raw=maybe", 400), ("/api/runs/%2e%2e%2f%2e%2e%2fetc/steps/1", 404),
])
def test_bad_input_is_a_clear_4xx_json_message(srv: Server, path: str, code: int) -> None:
    got, headers, body = srv.get(path)
    assert got == code, (path, got, body[:300])
    assert headers["content-type"].startswith("application/json")
    msg = json.loads(body)["error"]
    assert msg and "Traceback" not in msg and "\n" not in msg


@pytest.mark.parametrize("path", [
    "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/app.py", "/static/%2e%2e%2fapp.py",
    "/static/%252e%252e%252fapp.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/..\\app.py",
    "/static/vendor/..%5c..%5capp.py", "/static/.hidden", "/static/../../../../etc/passwd",
])
def test_no_file_outside_the_static_folder(srv: Server, path: str) -> None:
    code, _, body = srv.get(path)
    assert code == 404, (path, code)
    assert b"def create_app" not in body and b"root:" not in body


def test_read_only_every_other_method_is_refused(srv: Server) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, _, body = srv.get("/api/sql?q=SELECT%201", method=method)
        assert code == 405 and b"read-only" in body


def test_without_a_token_only_loopback_host_names_are_answered(srv: Server) -> None:
    code, _, body = srv.get("/api/runs", headers={"Host": "attacker.example:8050"})
    assert code == 403 and b"loopback" in body
    assert srv.get("/api/runs", headers={"Host": f"localhost:{srv.port}"})[0] == 200


def test_non_loopback_bind_requires_the_printed_token_on_pages_and_api(store: Path) -> None:
    s = Server(store, host="0.0.0.0")
    try:
        token = re.search(r"token=(\S+)", s.url_line).group(1)
        assert len(token) >= 24
        for path in ("/", "/run/alpha", "/sql", "/static/app.js", "/api/runs", "/api/sql?q=SELECT%201"):
            assert s.get(path)[0] == 401, path
            assert s.get(path + ("&" if "?" in path else "?") + "token=wrong")[0] == 401, path
            assert s.get(path, headers={"Authorization": f"token {token}"})[0] == 200, path
        code, headers, _ = s.get(f"/?token={token}")
        assert code == 200 and "k2repro_ui_token=" in headers.get("set-cookie", "")
        assert s.get("/api/runs", headers={"Cookie": f"k2repro_ui_token={token}"})[0] == 200
    finally:
        s.stop()


def test_a_given_token_is_required_on_loopback_too(store: Path) -> None:
    tok = "t0k3n-for-the-test-0123456789"
    s = Server(store, "--token", tok)
    try:
        assert s.get("/api/runs")[0] == 401 and s.get("/")[0] == 401
        assert s.get("/api/runs", headers={"Authorization": f"Bearer {tok}"})[0] == 200
    finally:
        s.stop()


def test_static_symlinks_are_refused(store: Path, tmp_path: Path) -> None:
    """A symlink inside the static folder (to a file outside) is not served, a plain file is."""
    import uvicorn

    from k2repro.ui.app import STATIC_DIR, create_app

    static = tmp_path / "static"
    shutil.copytree(STATIC_DIR, static)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the static folder\n")
    (static / "link.txt").symlink_to(secret)
    (static / "linkdir").symlink_to(tmp_path)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, static_dir=static), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        import urllib.error
        import urllib.request

        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/static/app.css") as r:
            assert r.status == 200
        for path in ("/static/link.txt", "/static/linkdir/secret.txt"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == 404 and b"outside" not in e.value.read()
    finally:
        server.should_exit = True
        th.join(timeout=10)


def test_cli_refuses_bad_arguments_in_one_line(store: Path) -> None:
    r = k2("ui", "--store", str(store), "--port", "70000")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--port 70000" in r.stderr
    r = k2("ui", "--store", str(store), "--token", "short", "--port", str(free_port()))
    assert r.returncode == 2 and "--token" in r.stderr and "Traceback" not in r.stderr


def _q(sql: str) -> str:
    from urllib.parse import quote

    return quote(sql)


def test_heatmap_block_cache_is_exact_and_takes_new_steps(tmp_path: Path) -> None:
    """The per-run block cache (built on the first wide request) gives, for every bucket it
    names, exactly the raw maximum/mean of its steps; layer rows logged after the build (a
    run still training) appear in the next heatmap."""
    import numpy as np

    from k2repro.audit.writer import append_table
    from k2repro.forensics.synthetic import SyntheticRun, write_run
    from k2repro.ui.data import StoreReader

    write_run(tmp_path, SyntheticRun(run_id="big", n_steps=6000, seed=3))
    r = StoreReader(tmp_path, cache_min_rows=0)
    try:
        h = r.heatmap("big", col="grad_norm", buckets=500)
        assert h["cached"] and h["lo"] == 1 and h["hi"] == 6000
        with r.cursor() as s:
            raw = s.execute("SELECT param, step, grad_norm FROM layer_stats WHERE run_id = 'big'").fetchnumpy()
        edges = h["bucket_start"] + [h["hi"] + 1]
        for i, p in enumerate(h["params"]):
            sel = raw["param"] == p
            st, v = raw["step"][sel], raw["grad_norm"][sel]
            want = [v[(st >= edges[b]) & (st < edges[b + 1])].max() for b in range(len(edges) - 1)]
            assert np.allclose(np.array(h["z"][i], dtype=float), np.array(want), rtol=1e-6, atol=0), p  # 7 digits sent
        m = r.heatmap("big", col="grad_norm", buckets=500, agg="mean")
        sel = raw["param"] == m["params"][0]
        st, v = raw["step"][sel], raw["grad_norm"][sel]
        want = v[(st >= edges[0]) & (st < edges[1])].mean()
        assert abs(m["z"][0][0] - want) <= 1e-6 * abs(want)
        param = h["params"][0]
        append_table(tmp_path, "big", "layer_stats", {"step": [6001, 6002], "param": [param, param],
                                                      "grad_norm": [1e6, 2.0]})
        h2 = r.heatmap("big", col="grad_norm", buckets=500)
        assert h2["hi"] == 6002 and max(v for v in h2["z"][0] if v is not None) == 1e6
    finally:
        r.close()


def test_runs_listing_sees_a_new_run(srv: Server, store: Path) -> None:
    from k2repro.forensics.synthetic import SyntheticRun, write_run

    assert srv.json("/api/runs")[1]["runs"] and srv.json("/api/runs/gamma")[0] == 404
    write_run(store, SyntheticRun(run_id="gamma", n_steps=50, seed=9))
    try:
        ids = {r["run_id"] for r in srv.json("/api/runs")[1]["runs"]}
        assert "gamma" in ids and srv.json("/api/runs/gamma")[0] == 200
    finally:
        shutil.rmtree(store / "gamma")
