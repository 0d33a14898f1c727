"""What every benchmark script shares: the prompt sets, prompt encoding, assumed Apple chips, small helpers."""

import json
import statistics
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Assumed Apple GPU specs (memory bandwidth bytes/s, dense fp16 FLOP/s) for the roofline projections.
CHIPS = {"M3 Max": (400e9, 14e12), "M4 Max": (546e9, 17e12), "M2 Ultra": (800e9, 27e12)}


def read_prompts(path: Path, count: int) -> list:
    """Questions from jsonl ("question", "turns" or "prompt") or plain text lines."""
    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = line
        if isinstance(record, dict):
            record = record.get("question") or (record.get("turns") or [None])[0] or record.get("prompt")
        if not isinstance(record, str):
            raise SystemExit(f"{path}: a line has no 'question', 'turns' or 'prompt' text")
        prompts.append(record)
        if len(prompts) == count:
            break
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def encode(tokenizer, text: str, chat_template: bool, vocab_size: int = 0) -> list:
    """Token ids, so that every method compared sees exactly the same prompt."""
    if vocab_size:  # the tiny word-level tokenizer knows no English: map bytes onto ids 2..vocab-2
        return [2 + byte % (vocab_size - 3) for byte in text.encode()]
    if chat_template:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec):
    return "-" if value is None else format(value, spec)
