"""`booruset review`: build the review table, then serve the app with uvicorn."""

from __future__ import annotations

import ipaddress
import secrets
import socket

from jobs.config import Config, ConfigError
from jobs.export import check_options
from review.app import ReviewApp
from store.workspace import Workspace

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: Config, ws: Workspace, host: str, port: int, token: str | None) -> int:
    import uvicorn

    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)  # reachable by others: never without a token
    check_options(cfg["export"])  # the page shows the KEY.txt export would write: with options it takes
    if ws.read_json("state/published.json") is None:
        raise ConfigError(f"{ws.root} has no tables yet: run `booruset run` (or ingest) first")
    listening = listen(host, port)  # before "open ...": a port in use must not print an address
    app = ReviewApp(cfg, ws, token)
    app.index.fresh()
    print(f"review: {app.index.total()} images of {ws.root}, indexed in {app.index.build_seconds:.1f} s", flush=True)
    port = listening.getsockname()[1]  # --port 0: the free port the system gave
    print(f"review: open {open_address(host, port, token)}  (Ctrl-C stops)", flush=True)
    hosts = ["*"] if not is_loopback(host) else [*LOOPBACK, host, f"[{host}]"]
    uvicorn.Server(uvicorn.Config(app.asgi(hosts), log_level="warning")).run(sockets=[listening])
    return 0


def open_address(host: str, port: int, token: str | None) -> str:
    """The address to open in a browser: the loopback one for a server on every address, an IPv6
    address in brackets (http://::1:8765/ opens nothing)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a port another server holds is one line and exit 2 (it
    printed this server's address, then uvicorn failed with exit 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigError(f"review: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
