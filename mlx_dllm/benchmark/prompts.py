"""The prompt sets shipped with the package (gsm8k, mt-bench, humaneval), or a user's file, as token ids."""

import json
from importlib import resources
from pathlib import Path
from typing import List

from ..chat_template import template_ids
from ..errors import DLLMError

BUILT_IN = ("gsm8k", "mt-bench", "humaneval")


def built_in_text(name: str) -> str:
    return resources.files(__package__).joinpath("prompts", f"{name}.jsonl").read_text(encoding="utf-8")


def parse_line(line: str, where: str) -> str:
    """A JSON string, or an object's "prompt", "question" or first of "turns"; any other line is plain text."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line
    if isinstance(record, dict):
        record = record.get("prompt") or record.get("question") or (record.get("turns") or [None])[0]
    if not isinstance(record, str):
        raise DLLMError(f"{where}: a line holds no prompt text (a JSON string, or 'prompt', 'question' or 'turns')")
    return record


def read_prompts(source: str, count: int) -> List[str]:
    """The first `count` prompts of a built-in set or of a jsonl / text file."""
    if source in BUILT_IN:
        text = built_in_text(source)
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DLLMError(
                f"--prompts {source}: not a built-in set ({', '.join(BUILT_IN)}) nor a readable file"
            ) from error
    prompts = [parse_line(line, source) for line in text.splitlines() if line.strip()][:count]
    if not prompts:
        raise DLLMError(f"--prompts {source}: no prompts")
    return prompts


def encode(tokenizer, text: str, vocab_size: int = 0) -> List[int]:
    """Token ids, so every mode sees the same prompt: the chat template when the tokenizer has one; the tiny
    word-level tokenizer knows no English, so for it (`vocab_size`) the bytes map onto ids 2..vocab-2."""
    if vocab_size:
        return [2 + byte % (vocab_size - 3) for byte in text.encode()]
    if tokenizer.has_chat_template:
        return template_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text)
