"""MiniMax-M2 output parsers: reasoning (`<think>...</think>`) and tool calls (`<minimax:tool_call>`), streamed
or not. `ChatOutputParser` / `parse_chat_output` are the entry points; docs/serving.md describes the formats."""

from moerun.runtime.parsers.chat_output import (REASONING_MODES, ChatDelta, ChatOutputParser, ParsedMessage,
                                                ReasoningMode, parse_chat_output)
from moerun.runtime.parsers.tool_calls import ToolCall, ToolCallDelta, new_tool_call_id
from moerun.runtime.parsers.values import typed_value

__all__ = ["REASONING_MODES", "ChatDelta", "ChatOutputParser", "ParsedMessage", "ReasoningMode", "ToolCall",
           "ToolCallDelta", "new_tool_call_id", "parse_chat_output", "typed_value"]
