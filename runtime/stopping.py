"""When a request ends, and the text it has produced so far.

A sampled token is a stop token (the checkpoint's EOS ids unless ignore_eos, and the request's stop_token_ids):
the request ends with reason "stop" and the token's text is not added. Otherwise its text joins the output and
the stop strings are searched across token boundaries (only where a new match can end); a match ends the
request, and the output text is cut before it (kept with include_stop_str_in_output). Neither applies before
min_tokens outputs. At max_tokens the reason is "length".

While a request runs, the last (longest stop string - 1) characters are held back from what is reported, since
they may be the start of a stop string that the next token completes.
"""

from __future__ import annotations

from moerun.runtime.request import Request


def append_token(request: Request, token: int) -> str | None:
    """Add a sampled token to request; the finish reason if it ends the request, else None."""
    request.token_ids.append(token)
    params = request.params
    count = request.num_output_tokens
    if token in request.stop_token_ids and count > params.min_tokens:
        request.stop_reason = token
        return _finish_text(request, "stop")
    if request.detokenizer is not None:
        before = len(request.output_text)
        request.output_text += request.detokenizer.add([token])
        if params.stop and count > params.min_tokens and _cut_at_stop_string(request, before):
            return "stop"
    if count >= request.max_tokens:
        return _finish_text(request, "length")
    return None


def text_to_report(request: Request) -> str:
    """Output text not reported yet (minus what a stop string might still claim while the request runs)."""
    end = len(request.output_text)
    if not request.finished and request.params.stop and not request.params.include_stop_str_in_output:
        end -= max(map(len, request.params.stop)) - 1
    if end <= request.num_text_sent:
        return ""
    text = request.output_text[request.num_text_sent:end]
    request.num_text_sent = end
    return text


def _finish_text(request: Request, reason: str) -> str:
    """Take the rest of the detokenizer's text (an incomplete character, as the full decode shows it)."""
    if request.detokenizer is not None:
        before = len(request.output_text)
        request.output_text += request.detokenizer.flush()
        if request.params.stop and request.num_output_tokens > request.params.min_tokens \
                and _cut_at_stop_string(request, before):
            return "stop"
    return reason


def _cut_at_stop_string(request: Request, before: int) -> bool:
    text, stops = request.output_text, request.params.stop
    start = max(0, before - max(map(len, stops)) + 1)
    found = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    if not found:
        return False
    index, stop = min(found)
    end = index + len(stop) if request.params.include_stop_str_in_output else index
    request.output_text = text[:end]
    request.stop_reason = stop
    return True
