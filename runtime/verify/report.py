"""Each check's result, the table that shows them, the JSON report and the exit code."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moerun.runtime.table import format_table

PASS, FAIL, NOT_POSSIBLE = "PASS", "FAIL", "NOT POSSIBLE"
TITLES = {"logprobs": "logprob fidelity", "template": "template token counts", "tools": "tool calling",
          "reasoning": "reasoning"}
CHECKS = tuple(TITLES)


@dataclasses.dataclass
class CheckResult:
    name: str  # one of CHECKS
    verdict: str  # PASS, FAIL or NOT_POSSIBLE
    summary: str  # the figures that decided it, in one line
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)  # why it failed, or why it was not possible

    @classmethod
    def judged(cls, name: str, summary: str, figures: dict[str, Any], failures: list[str]) -> CheckResult:
        return cls(name, FAIL if failures else PASS, summary, figures, failures)

    @classmethod
    def not_possible(cls, name: str, why: str, figures: dict[str, Any] | None = None) -> CheckResult:
        return cls(name, NOT_POSSIBLE, why, figures or {}, [why])


def table(results: list[CheckResult]) -> str:
    rows = [[TITLES[r.name], r.verdict, r.summary] for r in results]
    lines = [format_table(["check", "verdict", "figures"], rows)]
    for r in results:
        if r.verdict == FAIL:
            lines += [f"{TITLES[r.name]}: {failure}" for failure in r.failures]
    return "\n".join(lines)


def verdict_line(results: list[CheckResult], strict: bool) -> str:
    failed = [TITLES[r.name] for r in results if r.verdict == FAIL]
    unchecked = [TITLES[r.name] for r in results if r.verdict == NOT_POSSIBLE]
    if failed or (strict and unchecked):
        return f"FAIL: {', '.join(failed + (unchecked if strict else []))}"
    return "PASS" + (f" (not possible: {', '.join(unchecked)})" if unchecked else "")


def exit_code(results: list[CheckResult], strict: bool) -> int:
    """0 when no check failed (with `strict`, when every check also ran), else 1."""
    return 1 if verdict_line(results, strict).startswith("FAIL") else 0


def report_json(results: list[CheckResult], context: dict[str, Any], strict: bool) -> dict[str, Any]:
    return json_safe({**context, "verdict": verdict_line(results, strict),
                      "checks": [dataclasses.asdict(r) for r in results]})


def json_safe(value: Any) -> Any:
    """Infinite and NaN figures as the strings "inf", "-inf", "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
