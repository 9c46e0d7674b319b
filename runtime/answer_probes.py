"""What a manifest records for the template and answer checks of `moerun verify`, from the checkpoint's own
tokenizer and chat template and a trusted configuration's greedy answers:

- template: each TEMPLATE_CASES request's prompt token count as a chat request renders it (generation prompt
  included), what an endpoint's usage.prompt_tokens must equal;
- answers: each ANSWER_CASES request's greedy answer, parsed as moerun's server parses M2 output (reasoning split
  from content, tool calls as OpenAI tool_calls), what an endpoint's answers are judged against."""

from __future__ import annotations

from collections.abc import Callable

from moerun.runtime.parsers import parse_chat_output
from moerun.runtime.parsers.reasoning import THINK_START
from moerun.runtime.probe_set import ANSWER_CASES, TEMPLATE_CASES
from moerun.runtime.sampling_params import SamplingParams

ANSWER_TOKENS = 1024  # M2 reasons before it answers or calls a tool: room for both

# (prompt ids, max tokens) -> (the answer's text, "stop" or "length")
Complete = Callable[[list[int], int], tuple[str, str]]


def record_template_counts(tokenizer) -> list[dict]:
    return [{**case, "prompt_tokens": len(tokenizer.encode(tokenizer.apply_chat_template(
        case["messages"], tools=case.get("tools"))))} for case in TEMPLATE_CASES]


def record_answers(tokenizer, complete: Complete, max_tokens: int = ANSWER_TOKENS) -> dict:
    cases = []
    for case in ANSWER_CASES:
        prompt = tokenizer.apply_chat_template(case["messages"], tools=case.get("tools"))
        text, finish = complete(tokenizer.encode(prompt), max_tokens)
        # As the server parses it: the answer starts inside the reasoning when the prompt opens it.
        message = parse_chat_output(text, case.get("tools"), "split",
                                    starts_in_reasoning=prompt.rstrip("\n").endswith(THINK_START))
        cases.append({**case, "reference": {
            "content": message.content, "reasoning": message.reasoning_content,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in message.tool_calls],
            "finish": finish}})
    return {"max_tokens": max_tokens, "cases": cases}


def engine_completion(engine) -> Complete:
    """The engine's greedy answer, as its server would decode it (special tokens such as EOS left out)."""
    def complete(prompt_ids: list[int], max_tokens: int) -> tuple[str, str]:
        [output] = engine.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0))
        return output.output_text, output.finish_reason
    return complete
