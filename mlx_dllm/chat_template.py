"""Chat messages -> prompt ids, as `mlx_lm.generate` and its server apply a chat template."""

from typing import Dict, List, Optional

from jinja2 import TemplateError

from .errors import DLLMError


def template_ids(tokenizer, messages: List[Dict], options: Optional[Dict] = None) -> List[int]:
    """The template with the tokenizer's own defaults (thinking included) plus `options`, then encoded without
    added special tokens (the template wrote them)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(options or {}))
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DLLMError(f"the chat template failed: {message}") from error
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_thinking_id(tokenizer) -> Optional[int]:
    """The `</think>` token's id, None when the tokenizer has none."""
    token = tokenizer.convert_tokens_to_ids("</think>")
    return token if isinstance(token, int) and token != tokenizer.unk_token_id else None
