"""`finegrain serve`: a search index behind an HTTP API and a web page (FastAPI + uvicorn).

Layering: serve sits beside cli at the top; it uses index, eval, data and models, and nothing
below imports it. FastAPI, uvicorn and python-multipart are the optional extra
`finegrain[serve]`; this module itself imports none of them, so it can say what is missing.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import logging
from typing import TYPE_CHECKING

from finegrain.errors import FinegrainError

if TYPE_CHECKING:
    from finegrain.serve.config import ServeConfig

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart"}


def check_dependencies() -> None:
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise FinegrainError(f"`finegrain serve` needs {', '.join(missing)}, which are not installed. "
                             "Install them with: pip install 'finegrain[serve]'")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' reach only this machine; any other address reaches a network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_binding(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise FinegrainError(f"--host {host} makes the index reachable from other machines, so the API needs a "
                             "token: pass --token TOKEN (or set FINEGRAIN_SERVE_TOKEN), or bind --host 127.0.0.1.")


def serve(config: "ServeConfig", host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the index, then answer on host:port until interrupted."""
    check_binding(host, config.token)
    check_dependencies()
    import uvicorn

    from finegrain.serve.app import create_app

    log = logging.getLogger("finegrain.serve")  # index version switches, as uvicorn prints its own lines
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
