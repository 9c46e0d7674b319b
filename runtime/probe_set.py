"""The fixed probe set of a fingerprint manifest: chat in several languages and scripts, code, and tool use (a schema
with nested objects in non-alphabetical key order, a call and its result, reasoning history), rendered by each
checkpoint's own chat template. A deployment that changes the template, the tokenizer or the weights moves some
probe's prompt tokens or its distributions. Never edit a case: add one and bump PROBE_SET_VERSION."""

from __future__ import annotations

PROBE_SET_VERSION = "probes-v1"

_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a place.",
        # Keys deliberately not in alphabetical order: a template or server that sorts them changes the prompt.
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "options": {
                    "type": "object",
                    "properties": {"hourly": {"type": "boolean"}, "days": {"type": "integer", "minimum": 1}},
                },
            },
            "required": ["location"],
        },
    },
}

_WEATHER_CALL = {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"location": "Paris", "options": {"days": 3}}'}}

PROBES: tuple[dict, ...] = (
    {"name": "chat-en", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain in two sentences why the sky is blue."}]},
    {"name": "chat-zh", "messages": [{"role": "user", "content": "请用一句话解释什么是机器学习。"}]},
    {"name": "chat-ru", "messages": [{"role": "user", "content": "Назови три крупнейшие реки России и коротко опиши каждую."}]},
    {"name": "chat-ja", "messages": [{"role": "user", "content": "日本の首都はどこですか？簡単に説明してください。"}]},
    {"name": "chat-de", "messages": [{"role": "user", "content": "Wie viele Tage hat ein Schaltjahr, und warum?"}]},
    {"name": "chat-es", "messages": [{"role": "user", "content": "¿Cuál es la diferencia entre un virus y una bacteria?"}]},
    {"name": "chat-ar", "messages": [{"role": "user", "content": "ما هي عاصمة مصر؟ أجب بجملة واحدة."}]},
    {"name": "code-python", "messages": [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number iteratively."}]},
    {"name": "code-fix", "messages": [{"role": "user", "content": (
        "Fix the bug in this JavaScript:\n```js\nfunction sum(a) {\n  let s = 0;\n"
        "  for (let i = 0; i <= a.length; i++) s += a[i];\n  return s;\n}\n```")}]},
    {"name": "tool-call", "tools": [_WEATHER_TOOL], "messages": [
        {"role": "system", "content": "Use the tools when they help."},
        {"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]},
    {"name": "tool-result", "tools": [_WEATHER_TOOL], "messages": [
        {"role": "user", "content": "What's the weather in Paris for the next 3 days?"},
        {"role": "assistant", "content": "", "tool_calls": [_WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": '{"forecast": [{"day": 1, "high": 18}, {"day": 2, "high": 21}, {"day": 3, "high": 16}]}'}]},
    {"name": "reasoning-history", "messages": [
        {"role": "user", "content": "Is 221 a prime number?"},
        {"role": "assistant", "reasoning_content": "221 = 13 x 17, so it is not prime.",
         "content": "No: 221 = 13 × 17."},
        {"role": "user", "content": "And 223?"}]},
)
