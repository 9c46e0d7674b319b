"""`moerun serve`: the OpenAI-compatible HTTP server (docs/serving.md)."""

from __future__ import annotations

import click

from moerun.runtime.parsers import REASONING_MODES
from moerun.runtime.serve.http_guards import DEFAULT_MAX_BODY_BYTES

DEMO_MODEL_NAME = "moerun-demo"


@click.command()
@click.option("-c", "--config", type=str, default=None, help="YAML target (default: the embedded demo).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback is reachable from other machines: set an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="MOERUN_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every path but /health (the variable keeps it out of ps).")
@click.option("--served-model-name", default=None,
              help="The model name clients send and /v1/models lists (default: the checkpoint folder's name).")
@click.option("--reasoning-mode", type=click.Choice(REASONING_MODES), default="split", show_default=True,
              help="split: reasoning in reasoning_content; append_think: kept in content after <think>; off: as written.")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=DEFAULT_MAX_BODY_BYTES, show_default=True,
              help="Larger request bodies are refused with 413.")
@click.option("--max-concurrent-requests", type=click.IntRange(0), default=0, show_default=True,
              help="Generation requests in flight at once; more are refused with 429. 0: no cap (the engine queues).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds requests in flight get to finish after SIGINT/SIGTERM.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="One log line per request.")
def serve(config, host, port, api_key, served_model_name, reasoning_mode, max_body_bytes, max_concurrent_requests,
          shutdown_timeout, log_level, access_log):
    """Serve the model over the OpenAI API (chat, completions, models, health, metrics, tokenize)."""
    from moerun.runtime.commands.common import load_engine
    from moerun.runtime.launch import launch_env
    from moerun.runtime.run_config import BUILTIN_DEMO
    from moerun.runtime.serve import server
    from moerun.runtime.serve.app import AppOptions, create_app

    # Before loading: a port in use fails in a second, not after the weights. Under torchrun rank 0 serves; the
    # other ranks run its steps inside load_engine and end there.
    sock = server.bind(host, port) if launch_env().rank == 0 else None
    try:
        engine = load_engine(config)
        name = served_model_name or (DEMO_MODEL_NAME if engine.run.model_path == BUILTIN_DEMO else engine.folder.name)
        app, _ = create_app(engine, AppOptions(name, api_key, reasoning_mode, max_body_bytes, max_concurrent_requests),
                            engine.keepalive_interval_s)
        url = server.bound_url(sock)
        click.echo(f"moerun serve: {name} on {engine.backend.describe()}, OpenAI API at {url}/v1", err=True)
        if not server.is_loopback(host):
            click.echo(f"moerun serve: listening on {host}, reachable from other machines (--host was given)"
                       + ("" if api_key else "; no API key is set, so anyone who can reach it can use it"), err=True)
        server.run(app, sock, log_level, access_log, shutdown_timeout)
    finally:
        if sock is not None:
            sock.close()
    click.echo("moerun serve: stopped", err=True)
