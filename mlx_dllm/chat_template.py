"""Chat messages -> prompt ids, as `mlx_lm.generate` and its server apply a chat template, within a budget.

A template is code that came with a checkpoint: jinja's sandbox keeps it from touching anything, but not from
looping for hours or rendering gigabytes. Every render here stops after RENDER_SECONDS or RENDER_CHARACTERS.
"""

import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

from jinja2 import TemplateError

from .errors import DLLMError

RENDER_SECONDS = 10.0  # a real template renders in milliseconds
RENDER_CHARACTERS = 2**24  # 16 Mi characters: millions of tokens, past any model's context
TEMPLATE_FILE = "<template>"  # the file name jinja gives code compiled from a string, as transformers does


class RenderBudgetExceeded(Exception):
    pass


@contextmanager
def render_deadline(seconds: float):
    """Stop template code (jinja compiles it to Python) once `seconds` have passed: the trace runs on the
    template's own lines only, so the rest of the process is untouched."""
    end = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > end:
            raise RenderBudgetExceeded
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def render(tokenizer, messages: List[Dict], options: Optional[Dict] = None, add_generation_prompt: bool = True) -> str:
    """The template's text with the tokenizer's own defaults (thinking included) plus `options`; any failure,
    overrun or oversized output is one DLLMError line."""
    try:
        with render_deadline(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **(options or {})
            )
    except RenderBudgetExceeded:
        raise DLLMError(f"the chat template did not finish rendering within {RENDER_SECONDS:g} s") from None
    except MemoryError:
        raise DLLMError("the chat template's output does not fit in memory") from None
    except (TemplateError, ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
            RecursionError) as error:  # ArithmeticError: `1 / 0`, and the sandbox's range limit (OverflowError)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DLLMError(f"the chat template failed: {message}") from error
    if not isinstance(text, str):
        raise DLLMError(f"the chat template rendered {type(text).__name__}, not text")
    if len(text) > RENDER_CHARACTERS:
        raise DLLMError(f"the chat template rendered {len(text):,} characters, more than {RENDER_CHARACTERS:,}")
    try:
        text.encode("utf-8")  # a lone surrogate (a JSON "\udcff" in the template or its options) no tokenizer takes
    except UnicodeEncodeError as error:
        raise DLLMError(f"the chat template rendered text that is not UTF-8 (at character {error.start})") from None
    return text


def template_ids(
    tokenizer, messages: List[Dict], options: Optional[Dict] = None, add_generation_prompt: bool = True
) -> List[int]:
    """The rendered template encoded without added special tokens (the template wrote them)."""
    return list(tokenizer.encode(render(tokenizer, messages, options, add_generation_prompt), add_special_tokens=False))


def end_of_thinking_id(tokenizer) -> Optional[int]:
    """The `</think>` token's id, None when the tokenizer has none."""
    token = tokenizer.convert_tokens_to_ids("</think>")
    return token if isinstance(token, int) and token != tokenizer.unk_token_id else None
