"""OpenAI request bodies -> a `Job` for `stream_generate`.

Only the shape is checked here (which fields exist, which are ours); values go to `stream_generate`, whose
checks are the CLI's, so a bad value gets the same one-line message from the server as from `generate`.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..chat_template import template_ids
from ..errors import DLLMError
from ..sampler.arguments import whole_number
from ..sampler.mode import served_options
from .worker import Job

# OpenAI name -> stream_generate keyword.
SAMPLING = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "stop": "stop"}
# Ours, with the API's names: the mode, mlx-lm's num_draft_tokens and every option a mode declares.
OURS = ("mode", "num_draft_tokens", *(option.name for option in served_options()))
# OpenAI fields we take only at the value that means "off".
OFF_ONLY = {"n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
            "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],),
            "parallel_tool_calls": (True, False), "suffix": ("",)}
IGNORED = ("model", "user", "stream", "stream_options", "store", "metadata", "service_tier")


@dataclass
class Request:
    job: Job
    stream: bool
    include_usage: bool
    chat: bool


def parse(body: Any, chat: bool, tokenizer, max_tokens_limit: int) -> Request:
    if not isinstance(body, dict):
        raise DLLMError("the request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}  # null means: the default
    prompt_field = "messages" if chat else "prompt"
    known = {prompt_field, "max_tokens", "max_completion_tokens", *SAMPLING, *OURS, *OFF_ONLY, *IGNORED}
    if chat:
        known.add("chat_template_kwargs")
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
    if chat:
        prompt = chat_prompt(tokenizer, body["messages"], body.get("chat_template_kwargs"))
    else:
        prompt = completion_prompt(body["prompt"])
    options = {SAMPLING[name]: body[name] for name in SAMPLING if name in body}
    options.update({name: body[name] for name in OURS if name in body})
    options["max_tokens"] = requested_tokens(body, max_tokens_limit)
    return Request(Job(prompt, options), stream, include_usage, chat)


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


def chat_prompt(tokenizer, messages, template_options) -> List[int]:
    if not isinstance(messages, list) or not messages:
        raise DLLMError("messages must be a non-empty list")
    if not tokenizer.has_chat_template:
        raise DLLMError("the model has no chat template: use /v1/completions")
    if template_options is not None and not isinstance(template_options, dict):
        raise DLLMError("chat_template_kwargs must be a JSON object")
    return template_ids(tokenizer, [message_dict(m, i) for i, m in enumerate(messages)], template_options)


def message_dict(message, index: int) -> Dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise DLLMError(f"{where} must be an object with a role")
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
    extra = sorted(set(message) - {"role", "content", "name"})
    if extra:
        raise DLLMError(f"{where}.{extra[0]} is not supported")
    return {"role": message["role"], "content": content}


def completion_prompt(prompt) -> Optional[Any]:
    """Text, or a list of token ids (stream_generate checks them against the embedding table)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise DLLMError("prompt must be a string or a list of token ids")
