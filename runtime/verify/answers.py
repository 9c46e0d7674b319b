"""The endpoint's answers to the manifest's answer cases (tool prompts and reasoning prompts), asked once at
temperature 0 with the manifest's token budget and shared by the tool-calling and reasoning checks, which judge
them against the reference answers the manifest records."""

from __future__ import annotations

import dataclasses
from typing import Any

from moerun.runtime.verify.endpoint import Endpoint, Unanswered, first_choice
from moerun.runtime.verify.manifest import AnswerCase, VerifyManifest


@dataclasses.dataclass(frozen=True)
class Answer:
    case: AnswerCase
    content: str | None
    reasoning: str | None  # reasoning_content, or vLLM's newer `reasoning`
    tool_calls: list[dict[str, Any]]  # [{name, arguments}], arguments as the endpoint sent them
    finish: str | None


def ask_answers(endpoint: Endpoint, manifest: VerifyManifest) -> list[Answer] | str:
    """The answers, or why they could not be had."""
    if manifest.answers is None:
        return "the manifest has no reference answers (written before moerun fingerprint recorded them); rewrite it"
    answers = []
    for case in manifest.answers:
        body = {"messages": case.messages, "max_tokens": manifest.answer_tokens, "temperature": 0}
        if case.tools:
            body["tools"] = case.tools
        try:
            choice = first_choice(endpoint.chat(body))
        except Unanswered as e:
            return str(e)
        message = choice.get("message")
        if not isinstance(message, dict):
            return f"answer case {case.name}: the answer has no message"
        calls = []
        for call in message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                calls.append({"name": function.get("name"), "arguments": function.get("arguments")})
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        answers.append(Answer(case, _text(message.get("content")), _text(reasoning), calls,
                              choice.get("finish_reason")))
    return answers


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
