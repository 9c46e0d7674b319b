"""The fixed probe set of a fingerprint manifest, rendered by each checkpoint's own chat template:

- PROBES: chat in several languages and scripts, code, and tool use (a schema with nested objects in
  non-alphabetical key order, a call and its result, reasoning history): their logprobs fingerprint the weights;
- TEMPLATE_CASES: chat requests whose prompt token counts pin the template (system prompt, tool schemas, a
  multi-turn tool loop, reasoning history), ordered so the first that differs points at the cause;
- ANSWER_CASES: prompts that call for tools (one call, parallel calls, two tools) or for reasoning, whose parsed
  answers pin how a server splits reasoning and returns tool calls.

A deployment that changes the template, the tokenizer, the weights or the output parsing moves some case's figures.
Never edit a case: add one and bump PROBE_SET_VERSION."""

from __future__ import annotations

PROBE_SET_VERSION = "probes-v2"  # v2: TEMPLATE_CASES and ANSWER_CASES; PROBES as in v1

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

# A second tool whose schema nests an array of objects, its keys not in alphabetical order either.
_TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in one or more time zones.",
        "parameters": {
            "type": "object",
            "properties": {
                "zones": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"zone": {"type": "string", "description": "IANA name, e.g. Asia/Tokyo"},
                                   "label": {"type": "string"}},
                    "required": ["zone"]}},
                "format": {"type": "string", "enum": ["24h", "12h"]},
            },
            "required": ["zones"],
        },
    },
}

_CALLS = [
    {"id": "call_a", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius", "options": {"days": 2}}'}},
    {"id": "call_b", "type": "function", "function": {
        "name": "get_time", "arguments": '{"zones": [{"zone": "Europe/Paris", "label": "Paris"}], "format": "24h"}'}},
]

_RESULTS = [
    {"role": "tool", "tool_call_id": "call_a",
     "content": '{"forecast": [{"day": 1, "high": 18}, {"day": 2, "high": 21}]}'},
    {"role": "tool", "tool_call_id": "call_b", "content": '{"Paris": "14:05"}'},
]

# Each case adds one thing to the ones before it, so when the counts differ the first case that differs names
# what the deployment renders differently (a frame token shows up in the first case already).
TEMPLATE_CASES: tuple[dict, ...] = (
    {"name": "plain", "messages": [{"role": "user", "content": "Hello! Who are you?"}]},
    {"name": "system-prompt", "messages": [
        {"role": "system", "content": "You are a terse assistant. Answer in French, in one sentence."},
        {"role": "user", "content": "Hello! Who are you?"}]},
    {"name": "multi-turn", "messages": [
        {"role": "user", "content": "Give me a colour."},
        {"role": "assistant", "content": "Teal."},
        {"role": "user", "content": "Another one, please."}]},
    {"name": "tool-schemas", "tools": [_WEATHER_TOOL, _TIME_TOOL], "messages": [
        {"role": "user", "content": "What's the weather in Paris, and the time there?"}]},
    {"name": "tool-calls-and-results", "tools": [_WEATHER_TOOL, _TIME_TOOL], "messages": [
        {"role": "user", "content": "What's the weather in Paris, and the time there?"},
        {"role": "assistant", "content": "", "tool_calls": _CALLS},
        *_RESULTS]},
    {"name": "reasoning-history", "tools": [_WEATHER_TOOL, _TIME_TOOL], "messages": [
        {"role": "user", "content": "Is 221 a prime number?"},
        {"role": "assistant", "reasoning_content": "221 = 13 x 17, so it is not prime.",
         "content": "No: 221 = 13 × 17."},
        {"role": "user", "content": "What's the weather in Paris, and the time there?"},
        {"role": "assistant", "reasoning_content": "Two tools, one call each.", "content": "", "tool_calls": _CALLS},
        *_RESULTS]},
)

# kind "tool": the request offers tools and the prompt calls for them; "reasoning": no tools, an answer after thought.
ANSWER_CASES: tuple[dict, ...] = (
    {"name": "one-call", "kind": "tool", "tools": [_WEATHER_TOOL], "messages": [
        {"role": "user", "content": "What's the weather in Paris in celsius for the next 3 days?"}]},
    {"name": "parallel-calls", "kind": "tool", "tools": [_WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Compare today's weather in Paris and in Tokyo."}]},
    {"name": "two-tools", "kind": "tool", "tools": [_WEATHER_TOOL, _TIME_TOOL], "messages": [
        {"role": "user", "content": "What time is it in Tokyo (24h), and what's the weather there?"}]},
    {"name": "arithmetic", "kind": "reasoning", "messages": [
        {"role": "user", "content": "What is 17 × 24? Work it out, then give just the number."}]},
    {"name": "short-answer", "kind": "reasoning", "messages": [
        {"role": "user", "content": "Name one prime number between 10 and 20."}]},
)
