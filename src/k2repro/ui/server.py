"""Run the UI with uvicorn: bind, token, the line to open, and a clean stop on Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost` are loopback; every other address (0.0.0.0 above all)
    serves other machines and needs a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def choose_token(host: str, token: str | None) -> str | None:
    """The token the server requires: the one given, else a generated one for a non-loopback
    bind (as Jupyter does), else None (loopback, no token asked)."""
    if token is not None:
        if len(token) < 16 or not token.isprintable() or any(c in token for c in " ;,\"'"):
            raise BadInputError("--token: expected at least 16 printable characters without spaces, quotes, ';' or ','")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def url_for(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def check_port_free(host: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise BadInputError(f"--host {host} --port {port}: cannot bind ({exc.strerror}); "
                                f"choose another --port") from None


def serve(store: str | Path | None, host: str = "127.0.0.1", port: int = 8050, token: str | None = None,
          open_browser: bool = False, out: Any = None) -> int:
    """Serve until Ctrl-C / SIGTERM; prints the address (with the token) first."""
    import uvicorn

    from k2repro.ui.app import create_app

    out = out or sys.stdout
    tok = choose_token(host, token)
    check_port_free(host, port)
    app = create_app(store, token=tok)
    url = url_for(host, port, tok)
    print(f"k2repro ui: serving store {app.app.state.reader.root} at {url}", file=out, flush=True)
    if not is_loopback(host):
        print("k2repro ui: bound to a non-loopback address: every request needs the token above", file=out,
              flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False,
                            server_header=False, date_header=False, lifespan="off")
    try:
        uvicorn.Server(config).run()
    finally:
        app.app.state.reader.close()
    return 0
