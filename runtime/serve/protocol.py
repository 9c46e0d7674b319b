"""Request bodies of /v1/chat/completions and /v1/completions, validated before anything reaches the engine.

Fields are OpenAI's, plus the extensions vLLM clients send (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, stop_token_ids, chat_template_kwargs). Unknown fields are ignored, as vLLM and OpenAI's own SDKs
expect (clients send `user`, `metadata`, `store`, ...); what moerun cannot honour is refused with a 400 instead of
being ignored: n > 1, best_of > 1, logit_bias, a response_format other than text, completions' suffix,
non-text content parts. docs/serving.md has the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerun.runtime.parsers import ChatOutputParser, ReasoningMode
from moerun.runtime.parsers.reasoning import THINK_START
from moerun.runtime.serve.errors import bad_request, validation_error

MAX_LOGPROBS = 20  # the top-logprobs cap OpenAI and vLLM use
MAX_STOP_STRINGS = 64
INT64 = (-(2**63), 2**63 - 1)

# Template variables a client may not set through chat_template_kwargs: the server renders them itself.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})


def _no_reserved_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(value or {}))
    if clash:
        raise ValueError(f"{', '.join(clash)} cannot be set here: the server renders them from the request")
    return value


TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_no_reserved_kwargs)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False


class FunctionDefinition(_Model):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: FunctionName


class ToolCallFunction(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict) -> str | dict:
        # The chat template renders each argument, so it needs the object OpenAI sends as a JSON string.
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError("expected a JSON object (as a string)")
        return value


class MessageToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, got type {self.type!r}")
        return self


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The dict the chat template reads; OpenAI's `developer` role is a system message to M2."""
        message = self.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        return message


class _SamplingRequest(_Model):
    """What both endpoints share: the model, sampling, stops, streaming."""
    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 and 0: no cut
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    stop: list[str] | None = None  # a string is taken as a list of one
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    return_tokens_as_token_ids: bool = False  # vLLM: logprobs name tokens "token_id:N" (exact for fidelity checks)
    user: str | None = None

    @field_validator("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("expected a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS or any(s == "" for s in stops):
            raise ValueError(f"expected at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    # (field, is the value one moerun cannot honour, what to say): refused rather than silently ignored.
    UNSUPPORTED: ClassVar[tuple[tuple[str, Callable[[Any], bool], str], ...]] = (
        ("n", lambda v: v != 1, "only n=1 is supported"),
        ("logit_bias", bool, "logit_bias is not supported"),
    )

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        # Checks after field validation raise OpenAIError itself (pydantic passes it through) to name the field.
        for field, unsupported, message in self.UNSUPPORTED:
            if unsupported(getattr(self, field)):
                raise bad_request(message, param=field)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; M2 decides itself how many calls it makes
    chat_template_kwargs: TemplateKwargs = None
    response_format: dict[str, Any] | None = None
    UNSUPPORTED = _SamplingRequest.UNSUPPORTED + (
        ("response_format", lambda v: v is not None and v.get("type") != "text",
         "response_format: only {'type': 'text'} is supported (no JSON mode or schema)"),
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        choice = self.tool_choice
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and not self.tools:
            raise bad_request("tool_choice 'required' or a named function needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def effective_tool_choice(self) -> str:
        """"none", "auto", "required", or the name of the one tool the request forces."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools rendered into the prompt and parsed from the output: none with tool_choice "none" (the model
        is not offered tools, so it answers in text), only the named one when one is forced. M2 has no
        constrained decoding here, so "required" and a named choice are asked of the model, not enforced."""
        choice = self.effective_tool_choice
        if not self.tools or choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if choice not in ("auto", "required"):
            tools = [t for t in tools if t["function"]["name"] == choice]
        return tools

    def output_parser(self, prompt: str, reasoning: ReasoningMode) -> ChatOutputParser:
        """The parser for this request's output, given the rendered prompt: the output starts inside the
        reasoning when the prompt ends by opening it (M2's generation prompt ends `<think>\n`)."""
        return ChatOutputParser(self.offered_tools(), reasoning,
                                starts_in_reasoning=prompt.rstrip("\n").endswith(THINK_START))

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def template_kwargs(self) -> dict[str, Any]:
        return dict(self.chat_template_kwargs or {})


class CompletionRequest(_SamplingRequest):
    prompt: str | list[Annotated[int, Field(ge=0)]]  # one text or one list of token ids
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        # A batch of one is unwrapped; a longer batch would be several choices (n > 1), which is refused.
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported")
            value = value[0]
        if value == "" or value == []:
            raise ValueError("the prompt is empty")
        return value

    UNSUPPORTED = _SamplingRequest.UNSUPPORTED + (
        ("suffix", bool, "suffix is not supported"),
        ("best_of", lambda v: v not in (None, 1), "only best_of=1 is supported"),
    )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Model):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the template first."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        return self


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse_request(model: type[_Model], body: bytes | str) -> Any:
    """The request body as `model`, or an OpenAIError 400 naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None
