"""`k2repro ui`: the run browser (k2repro.ui). Thin: parse, serve, exit code."""

from __future__ import annotations

import argparse
import os

from k2repro.errors import BadInputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("A live, interactive run browser over the audit store: runs, curves, compare, layers, "
                          "steps, spikes, evals, SQL (docs/ui.md). Read-only; binds 127.0.0.1 unless told "
                          "otherwise, and any other address requires a token.")
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs --token or gets a generated one)")
    parser.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    parser.add_argument("--token", default=os.environ.get("K2REPRO_UI_TOKEN"),
                        help="require this token on every request (default: $K2REPRO_UI_TOKEN; generated and "
                             "printed for a non-loopback --host)")
    parser.add_argument("--open", action="store_true", help="open the page in a web browser")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise BadInputError(f"--port {args.port}: expected 1..65535")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise BadInputError(f"k2repro ui needs the 'ui' extra ({exc.name} is missing): "
                            f"pip install 'k2repro[ui]'") from None
    from k2repro.ui.server import serve

    return serve(args.store, host=args.host, port=args.port, token=args.token, open_browser=args.open)
