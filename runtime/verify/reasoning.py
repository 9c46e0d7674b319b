"""Reasoning, on every answer case (tool cases too: M2 reasons before it calls), against the reference answers:

- separated: no <think> or </think> in the content (where the reference's content has none: a random model may
  write the tag itself), and where the reference reasoned, the endpoint returns reasoning (reasoning_content, or
  vLLM's newer `reasoning`) rather than leaving it in the content or dropping it;
- no reasoning-only answers: an answer that ended by itself (finish "stop", not cut at the token budget) with
  reasoning but no content and no tool call, judged on the cases where the reference answered (content or calls):
  on a model that does not (random weights, or a budget too small to finish reasoning) there is none to judge."""

from __future__ import annotations

from moerun.runtime.parsers.reasoning import THINK_END, THINK_START
from moerun.runtime.verify.answers import Answer
from moerun.runtime.verify.report import CheckResult


def check_reasoning(answers: list[Answer] | str) -> CheckResult:
    if isinstance(answers, str):
        return CheckResult.not_possible("reasoning", answers)
    failures, cases = [], []
    judged = [a for a in answers if a.case.reference["content"] or a.case.reference["tool_calls"]]
    for answer in answers:
        name = answer.case.name
        if _has_tags(answer.content) and not _has_tags(answer.case.reference["content"]):
            failures.append(f"case {name}: reasoning tags in the content (reasoning not separated)")
        elif answer.case.reference["reasoning"] and not answer.reasoning:
            failures.append(f"case {name}: no reasoning returned where the reference reasoned "
                            f"({'left in the content' if answer.content else 'dropped'})")
        if answer in judged and reasoning_only(answer):
            failures.append(f"case {name}: a reasoning-only answer (it stopped with no content and no tool call)")
        cases.append({"name": name, "reasoning_chars": len(answer.reasoning or ""),
                      "content_chars": len(answer.content or ""), "tool_calls": len(answer.tool_calls),
                      "finish": answer.finish})
    split = sum(1 for a in answers if a.reasoning)
    only = sum(1 for a in judged if reasoning_only(a))
    summary = (f"{split}/{len(answers)} answers with reasoning returned apart, {only} reasoning-only of "
               f"{len(judged)} judged")
    return CheckResult.judged("reasoning", summary, {"cases": cases, "judged": [a.case.name for a in judged]},
                              failures)


def _has_tags(content: str | None) -> bool:
    return any(tag in (content or "") for tag in (THINK_START, THINK_END))


def reasoning_only(answer: Answer) -> bool:
    return answer.finish == "stop" and bool(answer.reasoning) and not answer.content and not answer.tool_calls
