"""Run an ASGI app on a real loopback socket in a background thread, so tests talk to it over HTTP as the `openai`
client and the load generator do (a free port is picked by the OS: several test runs can share the machine)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn


@contextlib.contextmanager
def serve_in_thread(app, startup_timeout_s: float = 30.0, lifespan: str = "off") -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) while `app` serves; stops it afterwards. lifespan "on" runs
    the app's startup and shutdown (moerun's app starts and stops its engine thread there)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(condition, timeout_s: float = 30.0, what: str = "the condition") -> None:
    """Poll `condition` (what another thread will make true) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)
