"""The endpoint under test: an OpenAI-compatible server at a base URL (http://host:port/v1), spoken to over plain
HTTP with a timeout on every request.

What goes wrong is told apart by whose it is: an endpoint that cannot be reached, refuses the key or does not serve
the model is bad input (MoerunError: one line, exit 2, before any check runs); an endpoint that refuses one kind of
request (no echo, no logprobs) or stops answering midway makes that check not possible (`Unanswered`), and the
other checks still run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx2

from moerun.backends.errors import MoerunError

TIMEOUT_S = 120.0  # per request: a prompt of ~1000 tokens and an answer of ~1000 on a loaded server
MAX_RESPONSE_BYTES = 64 << 20  # the largest answer, echoed top-20 logprobs of a few thousand tokens, is ~5 MB


class Unanswered(Exception):
    """The endpoint did not answer this request usefully (an HTTP error, a timeout, a body that is not JSON).
    `status`: the HTTP status of a refusal (400 for a request it would not serve), None when there was no answer."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Endpoint:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = TIMEOUT_S):
        if not url.startswith(("http://", "https://")):
            raise MoerunError(f"--endpoint: expected an http:// or https:// URL like http://127.0.0.1:8000/v1, "
                              f"got {url!r}")
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx2.Client(headers=headers, timeout=httpx2.Timeout(timeout_s))

    def close(self) -> None:
        self._client.close()

    def check_model(self) -> None:
        """Bad input, before any check: the endpoint unreachable, the key refused, or the model not among those
        GET /models lists (an endpoint without /models is let through: its answers will tell)."""
        try:
            status, data, _ = self._read("GET", "models")
        except Unanswered as e:
            raise MoerunError(f"--endpoint {self.url}: cannot reach it ({e})") from None
        if status in (401, 403):
            raise MoerunError(f"--endpoint {self.url}: refused the API key (HTTP {status}); give --api-key or "
                              f"MOERUN_API_KEY")
        try:
            served = [m["id"] for m in data["data"]] if status == 200 else None
        except (KeyError, TypeError):
            served = None
        if served is not None and self.model not in served:
            raise MoerunError(f"--model {self.model!r}: not served at {self.url} (it serves: "
                              f"{', '.join(map(str, served[:10])) or 'nothing'})")

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post("chat/completions", body)

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post("completions", body)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, data, raw = self._read("POST", path, {"model": self.model, **body})
        if status == 404 and _error_code(data) == "model_not_found":
            raise MoerunError(f"--model {self.model!r}: not served at {self.url} ({_error_message(data)})")
        if status != 200:
            raise Unanswered(f"{path}: HTTP {status} ({_error_message(data) or raw[:200].decode(errors='replace')})",
                             status)
        if not isinstance(data, dict):
            raise Unanswered(f"{path}: the answer is not a JSON object")
        return data

    def _read(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any, bytes]:
        """(status, the JSON body or None, the raw bytes), read in pieces within the size and time bounds (a
        server trickling bytes would otherwise reset the read timeout forever)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            with self._client.stream(method, f"{self.url}/{path}", json=body) as response:
                pieces, size = [], 0
                for piece in response.iter_bytes():
                    size += len(piece)
                    if size > MAX_RESPONSE_BYTES:
                        raise Unanswered(f"{path}: the answer is larger than {MAX_RESPONSE_BYTES >> 20} MB")
                    if time.monotonic() > deadline:
                        raise httpx2.TimeoutException("total time")
                    pieces.append(piece)
                status = response.status_code
        except httpx2.TimeoutException:
            raise Unanswered(f"{path}: no whole answer within {self.timeout_s:g} s") from None
        except httpx2.HTTPError as e:
            raise Unanswered(f"{path}: {_describe(e)}") from None
        raw = b"".join(pieces)
        try:
            return status, json.loads(raw), raw
        except (ValueError, UnicodeDecodeError):
            return status, None, raw


def first_choice(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer's first choice (Unanswered when it has none)."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Unanswered("the answer has no choices")
    return choices[0]


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _error_code(data: Any) -> Any:
    error = data.get("error") if isinstance(data, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _error_message(data: Any) -> str:
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", ""))[:300]
    return json.dumps(data)[:300] if data is not None else ""
