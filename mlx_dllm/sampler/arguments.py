"""The front's checks of what a caller passes: types, ranges and token ids, before anything reaches MLX."""

import numbers
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import DLLMError

SEED_LIMIT = 2**64  # mx.random.seed takes an unsigned 64-bit integer


def whole_number(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DLLMError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else "positive" if low == 1 else f"at least {low}"
        raise DLLMError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_models(model, draft_model) -> None:
    for name, value in (("model", model), ("draft_model", draft_model)):
        if value is not None and not isinstance(value, nn.Module):
            raise DLLMError(f"{name} must be an mlx.nn.Module (from mlx_dllm.load), got {type(value).__name__}")
    if model is None:
        raise DLLMError("model must be an mlx.nn.Module (from mlx_dllm.load), got None")


def wrap_tokenizer(tokenizer) -> TokenizerWrapper:
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")):
        raise DLLMError(f"tokenizer must be a Hugging Face or mlx-lm tokenizer, got {type(tokenizer).__name__}")
    return TokenizerWrapper(tokenizer)


def embedding_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's token embedding table (the smallest, if it has several), None if it has none."""
    tables = (nn.Embedding, nn.QuantizedEmbedding)
    modules = model.named_modules()
    rows = [m.weight.shape[0] for name, m in modules if name.endswith("embed_tokens") and isinstance(m, tables)]
    return min(rows) if rows else None


def check_text(name: str, text: str) -> str:
    """Text a tokenizer can take: a lone surrogate (undecodable bytes Python carried over) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DLLMError(f"{name} is not UTF-8 text (a lone surrogate at character {error.start})") from None
    return text


def _prompt_ids(tokenizer: TokenizerWrapper, prompt) -> List:
    if isinstance(prompt, str):
        check_text("the prompt", prompt)
        bos = tokenizer.bos_token
        return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))
    if isinstance(prompt, mx.array):
        if not mx.issubdtype(prompt.dtype, mx.integer):
            raise DLLMError(f"a prompt array must hold integer token ids, got {prompt.dtype}")
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    raise DLLMError(f"prompt must be text, a list of token ids or an mx.array, got {type(prompt).__name__}")


def encode_prompt(tokenizer: TokenizerWrapper, prompt, vocab_rows: Optional[int]) -> mx.array:
    """The prompt's ids, checked before anything reaches MLX: integers inside the embedding table."""
    ids = _prompt_ids(tokenizer, prompt)
    if not ids:
        raise DLLMError("the prompt is empty")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise DLLMError(f"prompt token ids must be integers, got {token!r}")
        if token < 0 or (vocab_rows is not None and token >= vocab_rows):
            raise DLLMError(f"token id {token} is outside the model's embedding table ({vocab_rows} rows)")
    return mx.array([int(token) for token in ids], dtype=mx.int32)


def tokenizer_eos_ids(tokenizer: TokenizerWrapper) -> set:
    ids = set(tokenizer.eos_token_ids or ())
    wrong = next((i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral)), None)
    if wrong is not None:
        raise DLLMError(f"the tokenizer's eos_token_ids must be integers, got {wrong!r}")
    return ids


def stop_strings(stop) -> tuple:
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise DLLMError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stops):
        raise DLLMError("stop strings must not be empty")
    return tuple(check_text("a stop string", s) for s in stops)
