"""OpenAI response bodies: completions, chat completions, their stream chunks, usage and errors."""

import time
import uuid
from typing import Dict, List, Optional


class Reply:
    """The bodies of one request's reply, all with the same id and creation time."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _body(self, choice: Dict, chunk: bool) -> Dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def whole(self, text: str, response, tool_calls: Optional[List[Dict]] = None,
              finish_reason: Optional[str] = None) -> Dict:
        """`finish_reason`: where it is not the generation's own (a reply of tool calls)."""
        finish_reason = finish_reason or response.finish_reason
        if self.chat:
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._body(choice, chunk=False), "usage": usage(response), "mlx_dllm": stats(response)}

    def chunk(self, text: str, finish_reason: Optional[str] = None, role: bool = False,
              tool_calls: Optional[List[Dict]] = None) -> Dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._body(choice, chunk=True)

    def usage_chunk(self, response) -> Dict:
        return {**self._body({}, chunk=True), "choices": [], "usage": usage(response), "mlx_dllm": stats(response)}


def usage(response) -> Dict:
    return {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.generation_tokens,
            "total_tokens": response.prompt_tokens + response.generation_tokens,
            "prompt_tokens_details": {"cached_tokens": response.cached_tokens}}


def stats(response) -> Dict:
    """Ours, beside OpenAI's fields: how the tokens were made."""
    return {"mode": response.mode, "forwards": response.forwards, "tokens_per_forward":
            round(response.tokens_per_forward, 3), "acceptance_length": response.acceptance_length,
            "generation_tps": round(response.generation_tps, 3), "speculation": response.speculation}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error(status: int, message: str) -> Dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": None}}
