"""Tool calling as `mlx_lm.server` does it: `tools` go to the chat template; the reply's calls are the text between
the tokenizer's tool-call markers, parsed by its tool parser (mlx-lm infers both from the chat template).

`tool_choice` and `parallel_tool_calls` are checked but, as in mlx_lm.server, do not constrain the model; "none"
leaves the reply unparsed, so it never carries tool calls.
"""

import json
import logging
from typing import Any, Dict, List, Optional, Tuple

from mlx_lm.generate import TextStateMachine
from mlx_lm.server import ToolCallFormatter

from ..errors import DLLMError

log = logging.getLogger("mlx_dllm.server")

CHOICES = ("auto", "none", "required")
TOOL_CHOICE_SHAPE = "tool_choice must be auto, none, required or {type: function, function: {name: ...}}"


def request_tools(tools) -> Optional[List[Dict]]:
    """The body's `tools` (None for none), each OpenAI's {type: function, function: {name, parameters, ...}}."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise DLLMError("tools must be a list of {type: function, function: {...}} objects")
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise DLLMError(f"{where} must be an object with type 'function' and a function object")
        extra = sorted(set(tool) - {"type", "function"})
        if extra:
            raise DLLMError(f"{where}.{extra[0]} is not supported")
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise DLLMError(f"{where}.function needs a name")
        if not isinstance(function.get("parameters", {}), dict):
            raise DLLMError(f"{where}.function.parameters must be a JSON Schema object")
    return tools


def parses_tool_calls(tools: Optional[List[Dict]], tool_choice, parallel_tool_calls) -> bool:
    """Whether the reply is parsed for tool calls: tools were given and tool_choice is not "none"."""
    if not isinstance(parallel_tool_calls, bool):
        raise DLLMError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise DLLMError(TOOL_CHOICE_SHAPE)
        if name not in {tool["function"]["name"] for tool in tools or ()}:
            raise DLLMError(f"tool_choice names the function {name!r}, which is not in tools")
    elif tool_choice not in CHOICES:
        raise DLLMError(TOOL_CHOICE_SHAPE)
    elif tool_choice == "required" and tools is None:
        raise DLLMError("tool_choice required needs tools")
    return tools is not None and tool_choice != "none"


def history_tool_calls(calls, where: str) -> List[Dict]:
    """An assistant message's `tool_calls` for the template, their JSON-string arguments decoded as mlx_lm.server
    decodes them (templates write them out as objects)."""
    if not isinstance(calls, list):
        raise DLLMError(f"{where} must be a list of tool calls")
    checked = []
    for index, call in enumerate(calls):
        here = f"{where}[{index}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise DLLMError(f"{here} must be an object with a function")
        call = {key: value for key, value in call.items() if value is not None}
        function = {key: value for key, value in call["function"].items() if value is not None}
        extra = sorted(set(call) - {"id", "type", "function"}) or sorted(set(function) - {"name", "arguments"})
        if extra:
            raise DLLMError(f"{here}.{extra[0]} is not supported")
        if call.get("type", "function") != "function" or not isinstance(call.get("id", ""), str):
            raise DLLMError(f"{here} must have type 'function' and a string id")
        if not isinstance(function.get("name"), str):
            raise DLLMError(f"{here}.function needs a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise DLLMError(f"{here}.function.arguments is not valid JSON") from None
        checked.append({**call, "function": {**function, "arguments": arguments}})
    return checked


class ToolCallParser:
    """A chat reply's text, chunk by chunk -> (content, tool calls): the text between the markers is one call,
    parsed when its end marker arrives (or the reply ends inside it) and never handed out as content."""

    def __init__(self, tokenizer, tools: List[Dict], streaming: bool):
        end = tokenizer.tool_call_end  # some formats (Mistral's) have none: the call runs to the reply's end
        machine = TextStateMachine({"normal": [(tokenizer.tool_call_start, "tool")],
                                    "tool": [(end, "normal")] if end else []})
        self._machine = machine.make_state("normal")
        self._format = ToolCallFormatter(tokenizer.tool_parser, tools, streaming)
        self._in_call = False
        self._call_text = ""
        self.calls = 0

    def add(self, text: str) -> Tuple[str, List[Dict]]:
        self._machine, segments = TextStateMachine.split(self._machine, text)
        return self._collect(segments)

    def finish(self) -> Tuple[str, List[Dict]]:
        """What the machine held back (a possible marker's start), and a call the reply ended inside."""
        self._machine, held, state = TextStateMachine.flush(self._machine)
        content, calls = self._collect([(state, held)])
        if self._in_call and self._call_text:
            calls += self._parse()
        return content, calls

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _collect(self, segments) -> Tuple[str, List[Dict]]:
        content, calls = "", []
        for state, text in segments:
            if state == "tool":
                self._call_text += text
            else:
                if self._in_call:
                    calls += self._parse()
                content += text
            self._in_call = state == "tool"
        return content, calls

    def _parse(self) -> List[Dict[str, Any]]:
        text, self._call_text = self._call_text, ""
        try:
            calls = self._format([text])
        except Exception as error:  # the model wrote a call its parser cannot read: dropped, as mlx_lm.server does
            log.warning("dropped a tool call that does not parse (%s)", type(error).__name__)
            return []
        self.calls += len(calls)
        return calls


def split_reply(tokenizer, tools: List[Dict], text: str) -> Tuple[str, List[Dict], "ToolCallParser"]:
    """A whole reply's (content, tool calls, parser)."""
    parser = ToolCallParser(tokenizer, tools, streaming=False)
    content, calls = parser.add(text)
    rest, more = parser.finish()
    return content + rest, calls + more, parser
