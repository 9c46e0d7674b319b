"""The parts of a fingerprint manifest that `moerun verify` reads (docs/fidelity.md has the format): the reference
probes with their floor, the template counts and the reference answers, each checked for shape before any request
is sent, so a damaged manifest is one line (exit 2) rather than a crash midway.

A manifest written before a part existed lacks it: the check that needs it is then not possible (it says why);
a manifest without probes at all is refused."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from moerun.backends.errors import MoerunError
from moerun.runtime.fingerprint import Fingerprint, read_manifest


@dataclasses.dataclass(frozen=True)
class TopRows:
    """Top-k lists, one per position, most likely first: row i is the distribution of token i + 1."""
    ids: list[list[int]]
    logprobs: list[list[float]]


@dataclasses.dataclass(frozen=True)
class ProbeCase:
    name: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_ids: list[int]
    greedy_ids: list[int]
    reference: TopRows
    floor: TopRows | None


@dataclasses.dataclass(frozen=True)
class TemplateCase:
    name: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class AnswerCase:
    name: str
    kind: str  # "tool" or "reasoning"
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    reference: dict[str, Any]  # content, reasoning (str or None), tool_calls [{name, arguments}], finish


@dataclasses.dataclass(frozen=True)
class VerifyManifest:
    source: str
    digest: str
    probe_set: str
    configuration: dict[str, Any]  # the trusted configuration the probes come from
    floor_configuration: dict[str, Any] | None
    max_new_tokens: int
    probes: list[ProbeCase]
    template: list[TemplateCase] | None
    answers: list[AnswerCase] | None
    answer_tokens: int | None


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str) -> MoerunError:
        return MoerunError(f"{self.source}: {where}: {what} (rewrite it with moerun fingerprint --probes-config)")

    def get(self, data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(f"{where}.{key}", f"missing or not {_kind_name(kind)}")
        return value

    def ints(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in value):
            raise self.fail(where, "expected a list of token ids")
        return value

    def rows(self, data: Any, where: str, count: int) -> TopRows:
        ids, logprobs = self.get(data, "top_ids", list, where), self.get(data, "top_logprobs", list, where)
        if len(ids) != count or len(logprobs) != count:
            raise self.fail(where, f"expected {count} rows of top_ids and top_logprobs (one per token)")
        for i, (row_ids, row_lps) in enumerate(zip(ids, logprobs)):
            self.ints(row_ids, f"{where}.top_ids[{i}]")
            if not (isinstance(row_lps, list) and len(row_lps) == len(row_ids) and row_ids
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and -math.inf < v <= 0
                            for v in row_lps)):
                raise self.fail(f"{where}.top_logprobs[{i}]", "expected one finite logprob (<= 0) per id of top_ids")
        return TopRows(ids, [[float(v) for v in row] for row in logprobs])

    def chat(self, data: Any, where: str) -> tuple[str, list, list | None]:
        name = self.get(data, "name", str, where)
        messages = self.get(data, "messages", list, where)
        tools = data.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(_is_tool(t) for t in tools)):
            raise self.fail(f"{where}.tools", "expected a list of OpenAI tools (function name, parameters object)")
        return name, messages, tools


def load_manifest(path: Path) -> VerifyManifest:
    source = str(path)
    data = read_manifest(path)
    digest = Fingerprint.from_json(data, source).digest
    r = _Reader(source)
    if not isinstance(data.get("probes"), dict):
        raise MoerunError(f"{source}: the manifest has no reference probes (write it with moerun fingerprint "
                          f"CHECKPOINT --out MANIFEST --probes-config trusted.yaml)")
    probes = data["probes"]
    floor = probes.get("floor")
    floor_cases = {}
    if floor is not None:
        for i, case in enumerate(r.get(floor, "cases", list, "probes.floor")):
            floor_cases[r.get(case, "name", str, f"probes.floor.cases[{i}]")] = case
    cases = []
    for i, case in enumerate(r.get(probes, "cases", list, "probes")):
        where = f"probes.cases[{i}]"
        name, messages, tools = r.chat(case, where)
        prompt = r.ints(r.get(case, "prompt_ids", list, where), f"{where}.prompt_ids")
        greedy = r.ints(r.get(case, "greedy_ids", list, where), f"{where}.greedy_ids")
        if not prompt:
            raise r.fail(f"{where}.prompt_ids", "empty")
        count = len(prompt) + len(greedy)
        floor_rows = None
        if floor is not None:
            if name not in floor_cases:
                raise r.fail("probes.floor.cases", f"no case {name!r}")
            floor_rows = r.rows(floor_cases[name], f"probes.floor.cases[{name!r}]", count)
        cases.append(ProbeCase(name, messages, tools, prompt, greedy, r.rows(case, where, count), floor_rows))
    return VerifyManifest(
        source=source, digest=digest, probe_set=r.get(probes, "probe_set", str, "probes"),
        configuration=r.get(probes, "configuration", dict, "probes"),
        floor_configuration=None if floor is None else r.get(floor, "configuration", dict, "probes.floor"),
        max_new_tokens=r.get(probes, "max_new_tokens", int, "probes"),
        probes=cases, template=_template(r, probes), **_answers(r, probes))


def _template(r: _Reader, probes: dict) -> list[TemplateCase] | None:
    if "template" not in probes:
        return None
    out = []
    for i, case in enumerate(r.get(probes, "template", list, "probes")):
        where = f"probes.template[{i}]"
        out.append(TemplateCase(*r.chat(case, where), r.get(case, "prompt_tokens", int, where)))
    return out


def _answers(r: _Reader, probes: dict) -> dict[str, Any]:
    if "answers" not in probes:
        return {"answers": None, "answer_tokens": None}
    answers = r.get(probes, "answers", dict, "probes")
    out = []
    for i, case in enumerate(r.get(answers, "cases", list, "probes.answers")):
        where = f"probes.answers.cases[{i}]"
        name, messages, tools = r.chat(case, where)
        kind = r.get(case, "kind", str, where)
        reference = r.get(case, "reference", dict, where)
        for key in ("content", "reasoning"):
            if reference.get(key) is not None and not isinstance(reference[key], str):
                raise r.fail(f"{where}.reference.{key}", "not a string or null")
        for j, call in enumerate(r.get(reference, "tool_calls", list, f"{where}.reference")):
            r.get(call, "name", str, f"{where}.reference.tool_calls[{j}]")
            r.get(call, "arguments", str, f"{where}.reference.tool_calls[{j}]")
        r.get(reference, "finish", str, f"{where}.reference")
        out.append(AnswerCase(name, kind, messages, tools, reference))
    return {"answers": out, "answer_tokens": r.get(answers, "max_tokens", int, "probes.answers")}


def _is_tool(tool: Any) -> bool:
    function = tool.get("function") if isinstance(tool, dict) else None
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("parameters", {}), dict))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
