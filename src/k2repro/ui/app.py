"""The UI's web app (Starlette): pages, static assets and the JSON API under /api/.

Why Starlette: a small, well-kept ASGI toolkit (the core FastAPI is built on) with no
template engine or ORM to pull in; uvicorn serves it. Pages are one static shell plus vanilla
JavaScript; the plotting (plot.js and the vendored uPlot, licences in THIRD-PARTY.md) lives in
k2repro/forensics/assets/, shared with the offline HTML reports, and is served under
/static/plot/. The pages read the same API that scripts use.

Safe by default (docs/ui.md, "Security"): read-only (GET and HEAD only; no endpoint writes);
a token, when set, is required on every request, pages and /api alike (401 without); without
a token only loopback Host headers are answered (a DNS-rebinding page cannot reach the
server); static files resolve inside the package's static folder only, symlinks refused; bad
input answers a 4xx JSON object naming the parameter, an unexpected error a 500 with no
traceback (logged on the server).
"""

from __future__ import annotations

import hmac
import logging
import math
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from k2repro.errors import K2ReproError
from k2repro.ui.data import (
    HEAT_AGGS,
    MAX_BUCKETS,
    MAX_POINTS,
    BadParam,
    NotFound,
    StoreReader,
    as_int,
    choice,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "k2repro_ui_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
SQL_MAX_ROWS = 10_000
SQL_TIMEOUT_S = 10.0
PAGES = ("runs", "run", "compare", "layers", "step", "spike", "evals", "sql")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
     b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
]


def _host_of(header: str) -> str:
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Guard:
    """ASGI middleware: token (when set) and loopback-Host checks on every request, GET/HEAD
    only, security headers on every answer."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        why, code, set_cookie = self._check(scope, headers)
        if why:
            await _plain_json(send, code, {"error": why})
            return

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = dict(msg)
                msg["headers"] = list(msg.get("headers", [])) + SECURITY_HEADERS + (
                    [(b"set-cookie", f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode())]
                    if set_cookie else [])
            await send(msg)

        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: dict, headers: dict[str, str]) -> tuple[str | None, int, bool]:
        if scope.get("method") not in ("GET", "HEAD"):
            return f"method {scope.get('method')} not allowed: the UI is read-only (GET only)", 405, False
        if self.token is None:
            if _host_of(headers.get("host", "")) not in LOOPBACK_HOSTS:
                return "this server answers loopback host names only (start it with --token to serve others)", 403, False
            return None, 200, False
        given = None
        from urllib.parse import parse_qs

        q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = q.get("token", [None])[0]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("token ") or auth.lower().startswith("bearer "):
            given = auth.split(" ", 1)[1].strip()
        elif from_query:
            given = from_query
        else:
            for part in headers.get("cookie", "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == TOKEN_COOKIE:
                    given = v
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            return "unauthorized: this server needs its token (?token=..., or the header Authorization: token ...)", 401, False
        return None, 200, bool(from_query)


async def _plain_json(send: Any, code: int, obj: dict) -> None:
    import json

    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + SECURITY_HEADERS})
    await send({"type": "http.response.body", "body": body})


def safe_static(root: Path, rel: str) -> Path | None:
    """The file `rel` names inside `root`, or None: no `..`, no absolute path, no backslash or
    encoded separator, no symlink anywhere on the way, no hidden file."""
    rel = unquote(rel)  # a second decoding: %252e%252e arrives here as %2e%2e
    if not rel or "\\" in rel or "\x00" in rel or rel.startswith("/") or "%" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    cur = root
    for p in parts:
        cur = cur / p
        if cur.is_symlink():
            return None
    try:
        real = cur.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_file() or not real.is_relative_to(root.resolve()):
        return None
    return real


def _float(v: Any, name: str, default: float) -> float:
    if v is None or v == "":
        return default
    try:
        f = float(v)
    except ValueError:
        raise BadParam(f"parameter '{name}': expected a number, got {str(v)[:40]!r}") from None
    if not math.isfinite(f):
        raise BadParam(f"parameter '{name}': expected a finite number")
    return f


def _q(request: Any, name: str) -> str | None:
    return request.query_params.get(name)


class Api:
    """The JSON endpoints under /api/: each turns a request's parameters (checked, 4xx on bad
    input) into one call of the store reader."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader

    def runs(self, request: Any) -> Any:
        return {"store": str(self.reader.root), "runs": self.reader.runs()}

    def run(self, request: Any) -> Any:
        return self.reader.run(request.path_params["run"])

    def curve(self, request: Any) -> Any:
        return self.reader.curve(request.path_params["run"], col=_q(request, "col") or "loss",
                            lo=as_int(_q(request, "lo"), "lo"), hi=as_int(_q(request, "hi"), "hi"),
                            points=as_int(_q(request, "points"), "points", 2, MAX_POINTS, 2000),
                            raw=_flag(_q(request, "raw"), "raw"),
                            x=choice(_q(request, "x"), "x", ("step", "tokens", "time"), "step"))

    def layers(self, request: Any) -> Any:
        return self.reader.heatmap(request.path_params["run"], col=_q(request, "col") or "update_ratio",
                              lo=as_int(_q(request, "lo"), "lo"), hi=as_int(_q(request, "hi"), "hi"),
                              buckets=as_int(_q(request, "buckets"), "buckets", 1, MAX_BUCKETS, 400),
                              agg=choice(_q(request, "agg"), "agg", HEAT_AGGS, "max"))

    def step(self, request: Any) -> Any:
        return self.reader.step(request.path_params["run"], _path_int(request, "step"))

    def spikes(self, request: Any) -> Any:
        return {"spikes": self.reader.spikes(request.path_params["run"])}

    def spike(self, request: Any) -> Any:
        return self.reader.spike(request.path_params["run"], _path_int(request, "spike"))

    def evals(self, request: Any) -> Any:
        return self.reader.evals(request.path_params["run"])

    def compare(self, request: Any) -> Any:
        refs = [r for r in (_q(request, "runs") or "").split(",") if r]
        if not 1 <= len(refs) <= 50:
            raise BadParam("parameter 'runs': give 1 to 50 comma-separated run ids")
        col = _q(request, "col") or "loss"
        points = as_int(_q(request, "points"), "points", 2, MAX_POINTS, 1000)
        lo, hi = as_int(_q(request, "lo"), "lo"), as_int(_q(request, "hi"), "hi")
        x = choice(_q(request, "x"), "x", ("step", "tokens", "time"), "step")
        curves = [self.reader.curve(r, col=col, lo=lo, hi=hi, points=points, x=x) for r in refs]
        infos = {r["run_id"]: r for r in self.reader.runs()}
        return {"curves": curves, "runs": [infos.get(c["run_id"]) for c in curves]}

    def diff(self, request: Any) -> Any:
        a, b = _q(request, "a"), _q(request, "b")
        if not a or not b:
            raise BadParam("parameters 'a' and 'b': two run ids are needed")
        return self.reader.diff(a, b)

    def sql(self, request: Any) -> Any:
        query = _q(request, "q")
        if not query:
            raise BadParam("parameter 'q': the SQL statement is missing")
        limit = as_int(_q(request, "limit"), "limit", 1, SQL_MAX_ROWS, 1000)
        timeout = min(_float(_q(request, "timeout"), "timeout", SQL_TIMEOUT_S), SQL_TIMEOUT_S)
        fmt = choice(_q(request, "format"), "format", ("json", "csv"), "json")
        res = self.reader.sql(query, limit, timeout if timeout > 0 else SQL_TIMEOUT_S)
        if fmt == "csv":
            from starlette.responses import Response

            return Response(_csv(res["columns"], res["rows"]), media_type="text/csv",
                            headers={"content-disposition": 'attachment; filename="k2repro-query.csv"'})
        return res


def create_app(store: str | Path | None, token: str | None = None, static_dir: Path | None = None) -> Any:
    """The ASGI app over the store at `store`; `token` None serves loopback clients only."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from k2repro.forensics.plots import ASSET_DIR

    reader = StoreReader(store)
    handlers = Api(reader)
    static = (static_dir or STATIC_DIR).resolve()
    plot_assets = ASSET_DIR.resolve()

    def api(fn: Any) -> Any:
        """Run a data call in the thread pool; map errors to 4xx/5xx JSON."""
        async def endpoint(request: Request) -> Response:
            try:
                obj = await run_in_threadpool(fn, request)
            except NotFound as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except K2ReproError as exc:  # BadParam, BadInputError, QueryTimeout
                from k2repro.audit.readonly import QueryTimeout

                code = 408 if isinstance(exc, QueryTimeout) else 400
                return JSONResponse({"error": _one_line(str(exc))}, status_code=code)
            except Exception:  # noqa: BLE001 - never a traceback to the client
                log.exception("ui: %s failed", request.url.path)
                return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)
            if isinstance(obj, Response):
                return obj
            return JSONResponse(obj)
        return endpoint

    def static_file(request: Request) -> Response:
        rel = request.path_params["path"]
        # the plotting (plot.js, vendored uPlot) is shared with the offline reports: forensics' assets
        path = safe_static(plot_assets, rel[len("plot/"):]) if rel.startswith("plot/") else safe_static(static, rel)
        if path is None:
            return JSONResponse({"error": "no such file"}, status_code=404)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=ctype)

    shell = (static / "page.html").read_text(encoding="utf-8")

    def page(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return HTMLResponse(shell.replace("{{PAGE}}", name))
        return endpoint

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return JSONResponse({"error": f"{code}: no route {request.url.path[:200]!r}"}, status_code=code)

    routes = [
        Route("/", page("runs")),
        Route("/run/{run}", page("run")),
        Route("/compare", page("compare")),
        Route("/layers/{run}", page("layers")),
        Route("/step/{run}/{step}", page("step")),
        Route("/spike/{run}/{spike}", page("spike")),
        Route("/evals/{run}", page("evals")),
        Route("/sql", page("sql")),
        Route("/static/{path:path}", static_file),
        Route("/api/runs", api(handlers.runs)),
        Route("/api/runs/{run}", api(handlers.run)),
        Route("/api/runs/{run}/curve", api(handlers.curve)),
        Route("/api/runs/{run}/layers", api(handlers.layers)),
        Route("/api/runs/{run}/steps/{step}", api(handlers.step)),
        Route("/api/runs/{run}/spikes", api(handlers.spikes)),
        Route("/api/runs/{run}/spikes/{spike}", api(handlers.spike)),
        Route("/api/runs/{run}/evals", api(handlers.evals)),
        Route("/api/compare", api(handlers.compare)),
        Route("/api/diff", api(handlers.diff)),
        Route("/api/sql", api(handlers.sql)),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.reader = reader
    return Guard(app, token)


def _flag(v: str | None, name: str) -> bool:
    if v in (None, "", "0", "false"):
        return False
    if v in ("1", "true"):
        return True
    raise BadParam(f"parameter '{name}': expected 0/1 or true/false, got {v[:20]!r}")


def _path_int(request: Any, name: str) -> int:
    v = as_int(request.path_params[name], name, 0, None)
    assert v is not None
    return v


def _one_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0][:500]


def _csv(columns: list[str], rows: list[list[Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


__all__ = ["create_app", "safe_static", "Guard", "PAGES", "TOKEN_COOKIE"]
