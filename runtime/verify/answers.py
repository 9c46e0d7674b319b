"""The endpoint's answers to the manifest's answer cases (tool prompts and reasoning prompts), asked once at
temperature 0 with the manifest's token budget and shared by the tool-calling and reasoning checks, which judge
them against the reference answers the manifest records.

Both checks tell two kinds of difference apart. A decision the model makes (to call a tool, how many calls, to
stop after its reasoning) may go another way in one case: a faithful endpoint's greedy path can part from the
reference's at a near-tie (a bfloat16 endpoint against a float32 reference does, now and then), so a check fails
on decisions only when more than ALLOWED_PARTINGS cases part. What a server does to the answer (markup or tags
left in the content, argument keys reordered, arguments outside the schema) fails in any one case."""

from __future__ import annotations

import dataclasses
from typing import Any

from moerun.runtime.verify.endpoint import Endpoint, Unanswered, first_choice
from moerun.runtime.verify.manifest import AnswerCase, VerifyManifest

ALLOWED_PARTINGS = 1


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


def parting_failure(partings: dict[str, str], of: int) -> list[str]:
    """The failure line when more than ALLOWED_PARTINGS of `of` cases decided otherwise than the reference
    (partings: case name -> how)."""
    if len(partings) <= ALLOWED_PARTINGS:
        return []
    return [f"{len(partings)} of {of} cases decided otherwise than the reference (more than {ALLOWED_PARTINGS} "
            f"parting at a near-tie): " + "; ".join(f"{name}: {how}" for name, how in partings.items())]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
