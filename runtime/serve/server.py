"""Listening and running: the socket (bound before the model loads, so a port in use fails fast), uvicorn on it,
and a graceful stop on SIGINT/SIGTERM (no new connections; requests in flight get `shutdown_timeout_s` to end;
then the engine thread stops)."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from moerun.backends.errors import MoerunError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it was the operator's explicit choice
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port). MoerunError naming the address otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MoerunError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MoerunError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def bound_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: FastAPI, sock: socket.socket, log_level: str = "info", access_log: bool = True,
        shutdown_timeout_s: float = 30.0) -> None:
    """Serve `app` on `sock` until SIGINT or SIGTERM, then shut down gracefully and return."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout_s)
    with _signals_end_serving():
        uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def _signals_end_serving() -> Iterator[None]:
    """uvicorn turns SIGINT/SIGTERM into a graceful shutdown, then re-raises the signal to the handler it found.
    That handler ignores it: the shutdown is done, and the command returns normally (exit code 0)."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
