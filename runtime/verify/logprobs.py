"""Logprob fidelity: the endpoint's top-k logprobs on the manifest's probes against the reference's, judged against
the floor (the manifest's second faithful configuration against the reference, on the same positions and k).

Two ways to get the endpoint's distributions:
- echo (teacher-forced): /v1/completions with the reference's tokens (prompt + greedy continuation) as a token-id
  prompt, `echo` and `logprobs`: every position of every probe, independent of the endpoint's chat template;
- chat (where echo is not offered): the probe's messages at temperature 0 with `top_logprobs`: the positions of the
  continuation for as long as the endpoint's tokens follow the reference's (after a different token the contexts
  differ), through the endpoint's template (a template that differs moves these figures too: see the template
  check).
Tokens are named by id (vLLM's `return_tokens_as_token_ids`, which moerun serves too): a token's text does not
name it uniquely, so an endpoint that answers with texts only makes the check not possible.

The verdict is the calibrated one of `moerun parity` (runtime/parity.py), with the manifest's reference in the role
of the high-precision run and its floor configuration in the role of the reference:
    median KL(reference || endpoint) <= k x median KL(reference || floor) + epsilon
    top-1(reference, endpoint)       >= top-1(reference, floor) - margin
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from moerun.runtime.parity import Calibration
from moerun.runtime.serve.responses import MIN_LOGPROB  # what OpenAI and vLLM report for -inf
from moerun.runtime.verify.endpoint import Endpoint, Unanswered, first_choice
from moerun.runtime.verify.manifest import ProbeCase, VerifyManifest
from moerun.runtime.verify.report import CheckResult
from moerun.runtime.verify.topk import PositionFigures, compare_position, median

# k = 2, not parity's 4: here the median runs over ~2000 positions (parity's small runs have ~32), so it is stable
# to a few percent, and the faithful candidates measured against a bfloat16 floor stay at or below 1.12x while
# 8-bit weights measure 2.0x and more (docs/fidelity.md, the table of margins). 2x the floor's KL is 1.41x its
# error amplitude: room for another order of rounding at the floor's precision, not for another precision.
CALIBRATION = Calibration(k=2.0)
TOP_K = 20  # asked of the endpoint; the comparison uses as many as it returns
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class _NotOffered(Exception):
    """The endpoint does not give what this path needs (echo, logprobs, token ids)."""


Rows = dict[int, tuple[list[int], list[float]]]  # row index -> (ids, logprobs), most likely first


def check_logprobs(endpoint: Endpoint, manifest: VerifyManifest, cal: Calibration = CALIBRATION) -> CheckResult:
    if not manifest.probes:
        return CheckResult.not_possible("logprobs", "the manifest has no probe cases")
    if any(case.floor is None for case in manifest.probes):
        return CheckResult.not_possible("logprobs", "the manifest has no floor (written before moerun fingerprint "
                                                    "recorded one); rewrite it")
    try:
        try:
            observed, path = [_echoed(endpoint, case) for case in manifest.probes], "echo"
        except _NotOffered as no_echo:
            try:
                observed, path = [_chat(endpoint, case) for case in manifest.probes], "chat"
            except _NotOffered as no_chat:
                return CheckResult.not_possible("logprobs", f"no echo ({no_echo}) and no chat logprobs ({no_chat})")
    except Unanswered as e:
        return CheckResult.not_possible("logprobs", str(e))
    return judge(manifest.probes, observed, path, cal)


def judge(cases: list[ProbeCase], observed: list[Rows], path: str, cal: Calibration) -> CheckResult:
    k = min([len(ids) for rows in observed for ids, _ in rows.values()] + [len(cases[0].reference.ids[0])])
    per_case, endpoint_all, floor_all = [], [], []
    for case, rows in zip(cases, observed):
        ref, flo = case.reference, case.floor
        pairs = [(compare_position(ref.ids[i], ref.logprobs[i], ids, lps, k),
                  compare_position(ref.ids[i], ref.logprobs[i], flo.ids[i], flo.logprobs[i], k))
                 for i, (ids, lps) in sorted(rows.items())]
        endpoint_figures, floor_figures = [p[0] for p in pairs], [p[1] for p in pairs]
        endpoint_all += endpoint_figures
        floor_all += floor_figures
        per_case.append({"name": case.name, "positions": len(pairs), **_summary(endpoint_figures, "endpoint"),
                         **_summary(floor_figures, "floor")})
    if not endpoint_all:
        return CheckResult.not_possible("logprobs", "the endpoint returned no positions to compare")
    figures = {"path": path, "k": k, "positions": len(endpoint_all), **_summary(endpoint_all, "endpoint"),
               **_summary(floor_all, "floor"), "calibration": dataclasses.asdict(cal)}
    kl_limit = cal.k * figures["floor_median_kl"] + cal.epsilon
    top1_limit = figures["floor_top1"] - cal.top1_margin_of(len(floor_all), figures["floor_top1"])
    figures.update(kl_limit=kl_limit, top1_limit=top1_limit, cases=per_case)
    failures = []
    if not figures["endpoint_median_kl"] <= kl_limit:
        failures.append(f"median KL {figures['endpoint_median_kl']:.3e} beyond {cal.k:g} x the floor's "
                        f"{figures['floor_median_kl']:.3e} + {cal.epsilon:.0e} = {kl_limit:.3e}")
    if not figures["endpoint_top1"] >= top1_limit:
        failures.append(f"top-1 agreement {figures['endpoint_top1']:.4f} below the floor's "
                        f"{figures['floor_top1']:.4f} - margin = {top1_limit:.4f}")
    if failures:
        worst = max(per_case, key=lambda c: c["endpoint_median_kl"] / max(c["floor_median_kl"], cal.epsilon))
        failures.append(f"furthest from its floor: probe {worst['name']} (median KL {worst['endpoint_median_kl']:.3e}, "
                        f"floor {worst['floor_median_kl']:.3e})")
    summary = (f"{path}, {len(endpoint_all)} positions, top-{k}: median KL {figures['endpoint_median_kl']:.2e} "
               f"(floor {figures['floor_median_kl']:.2e}, limit {kl_limit:.2e}), top-1 {figures['endpoint_top1']:.3f} "
               f"(floor {figures['floor_top1']:.3f}, limit {top1_limit:.3f})")
    return CheckResult.judged("logprobs", summary, figures, failures)


def _summary(figures: list[PositionFigures], who: str) -> dict[str, float]:
    n = max(len(figures), 1)
    return {f"{who}_median_kl": median([f.kl for f in figures]), f"{who}_top1": sum(f.top1 for f in figures) / n,
            f"{who}_overlap": sum(f.overlap for f in figures) / n}


def _echoed(endpoint: Endpoint, case: ProbeCase) -> Rows:
    """Every row, teacher-forced: entry i of the echo (i >= 1) is the distribution of token i, i.e. row i - 1;
    the one generated token's entry is row T - 1."""
    tokens = case.prompt_ids + case.greedy_ids
    try:
        answer = endpoint.completion({"prompt": tokens, "max_tokens": 1, "temperature": 0, "echo": True,
                                      "logprobs": TOP_K, "return_tokens_as_token_ids": True, "ignore_eos": True})
    except Unanswered as e:
        raise _NotOffered(str(e)) from None
    logprobs = first_choice(answer).get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        raise _NotOffered("the completion has no logprobs")
    names, tops = logprobs["tokens"], logprobs.get("top_logprobs")
    if len(names) < len(tokens) or not isinstance(tops, list) or len(tops) != len(names):
        raise _NotOffered("the prompt is not echoed with its logprobs")
    if [_token_id(n) for n in names[:len(tokens)]] != tokens:
        raise _NotOffered("the echoed prompt is not the token ids sent")
    return {i - 1: _sorted_top(tops[i]) for i in range(1, min(len(names), len(tokens) + 1))}


def _chat(endpoint: Endpoint, case: ProbeCase) -> Rows:
    """The continuation's rows while the endpoint's greedy tokens follow the reference's."""
    body = {"messages": case.messages, "max_tokens": len(case.greedy_ids) + 1, "temperature": 0, "logprobs": True,
            "top_logprobs": TOP_K, "return_tokens_as_token_ids": True}
    if case.tools:
        body["tools"] = case.tools
    content = (first_choice(endpoint.chat(body)).get("logprobs") or {}).get("content")
    if not isinstance(content, list) or not content:
        raise _NotOffered("the chat completion has no logprobs")
    rows, start = {}, len(case.prompt_ids) - 1
    for j, entry in enumerate(content[:len(case.greedy_ids) + 1]):
        if not isinstance(entry, dict) or not isinstance(entry.get("top_logprobs"), list):
            raise _NotOffered("a chat logprobs entry has no top_logprobs")
        rows[start + j] = _sorted_top({t.get("token"): t.get("logprob") for t in entry["top_logprobs"]
                                       if isinstance(t, dict)})
        if j == len(case.greedy_ids) or _token_id(entry.get("token")) != case.greedy_ids[j]:
            break  # the next position's context is no longer the reference's
    return rows


def _token_id(name: Any) -> int | None:
    match = _TOKEN_ID.match(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def _sorted_top(top: Any) -> tuple[list[int], list[float]]:
    """{"token_id:N": logprob} -> (ids, logprobs), most likely first."""
    if not isinstance(top, dict) or not top:
        raise _NotOffered("a position has no top logprobs")
    entries = []
    for name, logprob in top.items():
        token = _token_id(name)
        if token is None:
            raise _NotOffered(f"tokens are named by text ({str(name)[:20]!r}), not by id "
                              f"(return_tokens_as_token_ids is not supported)")
        if not isinstance(logprob, (int, float)) or isinstance(logprob, bool) or logprob != logprob:
            raise _NotOffered("a top logprob is not a number")
        entries.append((max(float(logprob), MIN_LOGPROB), token))
    entries.sort(key=lambda e: (-e[0], e[1]))
    return [t for _, t in entries], [lp for lp, _ in entries]
