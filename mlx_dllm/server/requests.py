"""OpenAI request bodies -> a `Job` for `stream_generate`.

Only the shape is checked here (which fields exist, which are ours); values go to `stream_generate`, whose
checks are the CLI's, so a bad value gets the same one-line message from the server as from `generate`.
"""

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mlx_lm.server import convert_chat

from ..chat_template import template_ids
from ..errors import DLLMError
from ..sampler.arguments import whole_number
from ..sampler.mode import served_options
from .tools import history_tool_calls, parses_tool_calls, request_tools
from .worker import Job

log = logging.getLogger("mlx_dllm.server")

# OpenAI name -> stream_generate keyword.
SAMPLING = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "stop": "stop"}
# Ours, with the API's names: the mode, mlx-lm's num_draft_tokens and every option a mode declares.
OURS = ("mode", "num_draft_tokens", *(option.name for option in served_options()))
# OpenAI fields we take only at the value that means "off".
OFF_ONLY = {"n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
            "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",)}
# Chat only: the template's inputs, and mlx_lm.server's role_mapping for a model without a template.
CHAT = ("chat_template_kwargs", "tools", "tool_choice", "parallel_tool_calls", "role_mapping")
IGNORED = ("model", "user", "stream", "stream_options", "store", "metadata", "service_tier")


@dataclass
class Request:
    job: Job
    stream: bool
    include_usage: bool
    chat: bool
    tools: Optional[List[Dict]] = None  # the reply is parsed for calls of these tools


def parse(body: Any, chat: bool, tokenizer, max_tokens_limit: int) -> Request:
    if not isinstance(body, dict):
        raise DLLMError("the request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}  # null means: the default
    prompt_field = "messages" if chat else "prompt"
    known = {prompt_field, "max_tokens", "max_completion_tokens", *SAMPLING, *OURS, *OFF_ONLY, *IGNORED}
    if chat:
        known.update(CHAT)
    unknown = sorted(set(body) - known)
    if unknown:
        raise DLLMError(f"unknown field {unknown[0]}")
    for name, allowed in OFF_ONLY.items():
        if name in body and body[name] not in allowed:
            raise DLLMError(f"{name}={body[name]!r} is not supported")
    if prompt_field not in body:
        raise DLLMError(f"the request needs {prompt_field}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise DLLMError(f"stream must be true or false, got {stream!r}")
    include_usage = stream_usage(body.get("stream_options"), stream)
    tools = None
    if chat:
        tools = request_tools(body.get("tools"))
        parse_calls = parses_tool_calls(tools, body.get("tool_choice", "auto"), body.get("parallel_tool_calls", True))
        prompt = chat_prompt(tokenizer, body["messages"], body.get("chat_template_kwargs"), tools,
                             body.get("role_mapping"))
        tools = tools if parse_calls and tokenizer.has_tool_calling else None
    else:
        prompt = completion_prompt(body["prompt"])
    options = {SAMPLING[name]: body[name] for name in SAMPLING if name in body}
    options.update({name: body[name] for name in OURS if name in body})
    options["max_tokens"] = requested_tokens(body, max_tokens_limit)
    return Request(Job(prompt, options), stream, include_usage, chat, tools)


def requested_tokens(body: Dict, limit: int) -> int:
    given = [body[name] for name in ("max_completion_tokens", "max_tokens") if name in body]
    if not given:
        return limit
    tokens = whole_number("max_tokens", given[0], 1)
    if len(given) == 2 and given[1] != given[0]:
        raise DLLMError("max_tokens and max_completion_tokens disagree; give one")
    if tokens > limit:
        raise DLLMError(f"max_tokens must be at most {limit} (the server's --max-tokens), got {tokens}")
    return tokens


def stream_usage(stream_options, stream: bool) -> bool:
    if stream_options is None:
        return False
    if not stream:
        raise DLLMError("stream_options needs stream: true")
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
        raise DLLMError("stream_options takes only include_usage")
    include = stream_options.get("include_usage", False)
    if not isinstance(include, bool):
        raise DLLMError(f"stream_options.include_usage must be true or false, got {include!r}")
    return include


def chat_prompt(tokenizer, messages, template_options, tools=None, role_mapping=None) -> List[int]:
    """The chat template's ids with the tools, as mlx_lm.server renders them; without a template, its role-mapping
    prompt (`convert_chat`) encoded as it encodes it."""
    if not isinstance(messages, list) or not messages:
        raise DLLMError("messages must be a non-empty list")
    messages = [message_dict(m, i) for i, m in enumerate(messages)]
    if template_options is not None and not isinstance(template_options, dict):
        raise DLLMError("chat_template_kwargs must be a JSON object")
    if role_mapping is not None and not (isinstance(role_mapping, dict)
                                         and all(isinstance(v, str) for v in role_mapping.values())):
        raise DLLMError("role_mapping must be a JSON object of strings")
    if not tokenizer.has_chat_template:
        if tools:
            raise DLLMError("tools need a chat template to reach the model, and the model has none")
        return list(tokenizer.encode(convert_chat(messages, role_mapping)))
    if tools and not tokenizer.has_tool_calling:
        log.warning("tools given, but mlx-lm finds no tool-call format in the model's chat template: "
                    "its calls come back as text")
    options = {**(template_options or {}), **({"tools": tools} if tools else {})}
    return template_ids(tokenizer, messages, options)


# Beside role and content: what tool use needs, by role.
MESSAGE_FIELDS = {"assistant": ("name", "tool_calls"), "tool": ("name", "tool_call_id")}


def message_dict(message, index: int) -> Dict[str, Any]:
    """One message as the template gets it; a null field is an absent one, as in the body."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise DLLMError(f"{where} must be an object with a role")
    message = {key: value for key, value in message.items() if value is not None}
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI content parts: text only
        kinds = {part.get("type") if isinstance(part, dict) else None for part in content}
        if kinds - {"text"}:
            raise DLLMError(f"{where}: only text content is supported")
        if not all(isinstance(part.get("text"), str) for part in content):
            raise DLLMError(f"{where}: a text part needs a text string")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise DLLMError(f"{where}.content must be a string or a list of text parts")
    fields = MESSAGE_FIELDS.get(message["role"], ("name",))
    extra = sorted(set(message) - {"role", "content", *fields})
    if extra:
        raise DLLMError(f"{where}.{extra[0]} is not supported" + (f" in a {message['role']} message" if
                        extra[0] in ("tool_calls", "tool_call_id") else ""))
    checked = {"role": message["role"], "content": content}
    for name in ("name", "tool_call_id"):
        if name in message:
            if not isinstance(message[name], str):
                raise DLLMError(f"{where}.{name} must be a string")
            checked[name] = message[name]
    if "tool_calls" in message:
        checked["tool_calls"] = history_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    return checked


def completion_prompt(prompt) -> Optional[Any]:
    """Text, or a list of token ids (stream_generate checks them against the embedding table)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise DLLMError("prompt must be a string or a list of token ids")
