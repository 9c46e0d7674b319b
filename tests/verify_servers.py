"""What `moerun verify` tests and tests/verify_sweep.py share: chat checkpoints and their degraded copies, manifests,
moerun's own server on a checkpoint (the real engine) or on a scripted engine, degradations of a server that live
here, in tests, never in the product (answers rewritten on their way out: tool-call arguments re-serialized with
sorted keys, tool calls left as markup in the content; echo refused), and verify run in-process."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from fastapi import Request
from fastapi.responses import JSONResponse, Response

import degrade
import hf_checkpoints
from live_server import serve_in_thread
from moerun.runtime.cli import main
from moerun.runtime.engine import Engine
from moerun.runtime.run_config import parse_run_config
from moerun.runtime.serve.app import AppOptions, create_app

MODEL = "m2-under-test"
WEIGHT_CHANGES = ("q4", "q8", "noise-1pct", "another-seed")

# request body -> the answer's body (changed in place or replaced)
Rewrite = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def chat_checkpoint(shape: str, folder: Path, seed: int) -> Path:
    """A bf16 chat checkpoint (transformers-saved weights, the random demo's tokenizer and M2 template)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return hf_checkpoints.save_chat_checkpoint(shape, folder, torch.bfloat16, seed)


def degraded_copy(src: Path, dst: Path, change: str, shape: str, seed: int) -> Path:
    """src with one of WEIGHT_CHANGES (4-bit or 8-bit weights, group 128; 1% noise on layer 0's matrices; the same
    architecture drawn from another seed) or of degrade.TEMPLATE_CHANGES."""
    if change in degrade.TEMPLATE_CHANGES:
        degrade.write_template_variant(src, dst, change)
    elif change == "another-seed":
        chat_checkpoint(shape, dst, seed + 1000)
    elif change == "noise-1pct":
        degrade.write_layer_noise(src, dst, layer=0, relative=0.01, seed=seed)
    else:
        degrade.write_fake_quantized(src, dst, bits={"q4": 4, "q8": 8}[change])
    return dst


def write_manifest(folder: Path, out: Path, probe_tokens: int, answer_tokens: int) -> Path:
    """`moerun fingerprint` with probes from cpu float32 and its default floor (cpu bfloat16)."""
    trusted = out.with_suffix(".yaml")
    trusted.write_text(yaml.safe_dump({"backend": "cpu", "model": {"path": str(folder), "dtype": "float32"}}))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["fingerprint", str(folder), "--out", str(out), "--probes-config", str(trusted),
                     "--probe-tokens", str(probe_tokens), "--answer-tokens", str(answer_tokens)])
    assert code == 0
    return out


def run_verify(url: str, manifest: Path, out: Path, *extra: str, model: str = MODEL) -> tuple[int, dict, str]:
    """`moerun verify` in-process: (exit code, the JSON report, the printed table)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(["verify", "--endpoint", url, "--model", model, "--manifest", str(manifest), "--out", str(out),
                     *extra])
    return code, json.loads(out.read_text()), stdout.getvalue()


def engine_for(folder: Path, backend: str = "cpu", dtype: str = "bfloat16") -> Engine:
    """moerun's engine on folder; the Ascend backend emulated."""
    raw = {"backend": backend, "model": {"path": str(folder), "dtype": dtype},
           "kv_cache": {"num_blocks": 256, "block_size": 128 if backend == "ascend" else 16}}
    if backend == "ascend":
        raw["ascend"] = {"emulate": True}
    with contextlib.redirect_stderr(io.StringIO()):  # the emulation's notice
        return Engine(parse_run_config(raw, folder))


@contextlib.contextmanager
def served(engine: Any, reasoning: str = "split", rewrite: Rewrite | None = None, refuse_echo: bool = False,
           api_key: str | None = None) -> Iterator[str]:
    """The base URL (.../v1) of moerun's app on `engine` while it serves."""
    app, _ = create_app(engine, AppOptions(MODEL, api_key=api_key, reasoning=reasoning))
    if rewrite is not None or refuse_echo:
        app.middleware("http")(_degrade(rewrite, refuse_echo))
    with serve_in_thread(app, lifespan="on") as url:
        yield f"{url}/v1"


def _degrade(rewrite: Rewrite | None, refuse_echo: bool):
    async def middleware(request: Request, call_next):
        body = json.loads(await request.body() or b"{}") if request.method == "POST" else {}
        if refuse_echo and request.url.path.endswith("/completions") and body.get("echo"):
            return JSONResponse({"error": {"message": "echo is not supported", "type": "invalid_request_error",
                                           "param": "echo", "code": None}}, status_code=400)
        response = await call_next(request)
        if rewrite is None or response.headers.get("content-type") != "application/json":
            return response
        answer = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
        return Response(json.dumps(rewrite(body, answer)), status_code=response.status_code,
                        media_type="application/json")
    return middleware


def sort_argument_keys(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A server that re-serializes each tool call's arguments with sorted keys."""
    for choice in answer.get("choices", []):
        for call in (choice.get("message") or {}).get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(json.loads(call["function"]["arguments"]), sort_keys=True)
    return answer


def calls_left_in_content(request: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A server without M2's tool-call parser: the calls stay in the content as the model wrote them."""
    for choice in answer.get("choices", []):
        message = choice.get("message") or {}
        calls = message.pop("tool_calls", None) or []
        markup = "".join(f'<minimax:tool_call>\n<invoke name="{c["function"]["name"]}">\n</invoke>\n'
                         f"</minimax:tool_call>" for c in calls)
        message["content"] = (message.get("content") or "") + markup
        if calls:
            choice["finish_reason"] = "stop"
    return answer

