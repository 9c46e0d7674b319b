"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with their HTTP status.

The `openai` client turns the status into its exception class (400 BadRequestError, 401 AuthenticationError, 404
NotFoundError, ...) and exposes message, type, param and code from this body. The context-length message keeps
the wording OpenAI and vLLM have used for years, because clients match it with regular expressions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pydantic


@dataclasses.dataclass
class OpenAIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def context_length_exceeded(max_model_len: int, prompt_tokens: int, max_tokens: int,
                            param: str = "messages") -> OpenAIError:
    """The prompt plus the tokens asked for do not fit the context. `param`: "messages" (chat) or "prompt"."""
    where = "messages" if param == "messages" else "prompt"
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the completion). "
        f"Please reduce the length of the {where} or completion.", param=param, code="context_length_exceeded")


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'.",
                       param=None, code="invalid_api_key")


def model_not_found(name: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist. This server serves `{served}`.",
                       type="invalid_request_error", param="model", code="model_not_found")


def not_found(path: str) -> OpenAIError:
    return OpenAIError(404, f"No route {path}.", type="invalid_request_error", code="not_found")


def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(405, f"{method} is not allowed on {path}.", code="method_not_allowed")


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


def validation_error(error: pydantic.ValidationError | Any) -> OpenAIError:
    """A 400 naming the invalid field (pydantic's and FastAPI's validation errors both have .errors()). Of the
    errors a union produces (one per member) the deepest is the one that says what is wrong."""
    errors = error.errors()
    deepest = max(errors, key=lambda e: len(e.get("loc", ())))
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("The request body is not valid JSON.", code="invalid_json")
    param = ".".join(_field_path(deepest.get("loc", ()))) or None
    message = deepest.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param=param)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_path(loc: tuple) -> list[str]:
    """The field names and list indices of a location, without the union-member tags (`list[int]`, a class
    name) that pydantic inserts or FastAPI's leading "body"."""
    path = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif part != "body" and re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in _UNION_TAGS:
            path.append(part)
    return path


def engine_refused(message: str) -> OpenAIError:
    """A request the engine itself refuses (a token id outside the vocabulary, more KV blocks than the cache)."""
    code = "context_length_exceeded" if message.startswith("This model's maximum context length") else None
    return bad_request(message, code=code)


def too_many_requests(limit: int) -> OpenAIError:
    return OpenAIError(429, f"The server already has {limit} requests in flight (its limit); retry later.",
                       type="requests", code="rate_limit_exceeded")


def server_error(message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(500, message, type="server_error", code=code)
