"""Training data for a drafter: prompts (the target writes the responses) or finished prompt/response pairs.

DFlash drafters learn the target's own distribution, so responses come from the target itself: greedy, through
its chat template, batched with mlx-lm's BatchGenerator and cached as JSONL shards that a rerun reuses.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from ..chat_template import template_ids
from ..errors import DLLMError

PROMPT_KEYS = ("prompt", "question", "instruction")
SHARD_SIZE = 64


@dataclass(frozen=True)
class Record:
    prompt: str
    response: Optional[str] = None  # None: the target writes it


@dataclass(frozen=True)
class Example:
    """One training sequence: chat-formatted prompt ids then response ids (ending in the stop token if any)."""

    ids: List[int]
    response_start: int


def read_records(file: Path) -> List[Record]:
    """JSONL, one record per line: the prompt (`prompt`, `question`, `instruction`, the first of `turns`, or a plain
    string) and optionally a finished `response`. Other fields (GSM8K's reference `answer`) are not responses: a
    drafter learns the target's own outputs. Blank lines are skipped."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DLLMError(f"cannot read --data {file}: {getattr(error, 'strerror', None) or error}") from error
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DLLMError(f"{file} line {number} is not JSON: {error.msg}") from error
        records.append(_record(value, f"{file} line {number}"))
    if not records:
        raise DLLMError(f"{file} holds no prompts")
    return records


def _record(value, where: str) -> Record:
    if isinstance(value, str):
        prompt, fields = value, {}
    elif isinstance(value, dict):
        fields = value
        prompt = next((value[key] for key in PROMPT_KEYS if key in value), None)
        turns = value.get("turns")
        if prompt is None and isinstance(turns, list) and turns:
            prompt = turns[0]
    else:
        raise DLLMError(f"{where}: expected an object or a string, got {type(value).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DLLMError(f"{where}: no prompt (give one of {', '.join(PROMPT_KEYS)}, or turns)")
    response = fields.get("response")
    if response is not None and (not isinstance(response, str) or not response):
        raise DLLMError(f"{where}: `response` must be a non-empty string (or leave it out: the target writes one)")
    return Record(prompt, response)


def held_out(prompt: str, fraction: float) -> bool:
    """A stable split by the prompt's hash: the same prompt is held out in every run and every ordering."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return digest / 2**64 < fraction


def split(records: Sequence[Record], fraction: float):
    """(train, held-out): held-out prompts are never trained on."""
    train = [record for record in records if not held_out(record.prompt, fraction)]
    evaluation = [record for record in records if held_out(record.prompt, fraction)]
    if not train:
        raise DLLMError("every prompt fell in the held-out split; give more prompts or a smaller --held-out")
    return train, evaluation


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """The prompt as the target sees it when generating: its chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DLLMError("the target's tokenizer has no chat template, which training on chat prompts needs")
    return template_ids(tokenizer, [{"role": "user", "content": prompt}])


def pair_example(tokenizer, record: Record) -> Example:
    """A finished pair: the prompt ids, then the response as the template renders an assistant turn."""
    start = prompt_ids(tokenizer, record.prompt)
    messages = [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.response}]
    full = template_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(start)] != start:  # a template that rewrites earlier turns: append the response as text
        full = start + list(tokenizer.encode(record.response, add_special_tokens=False))
    return Example(full, len(start))


def shard_key(model_id: str, prompts: Sequence[str], max_tokens: int) -> str:
    digest = hashlib.sha256(json.dumps([model_id, max_tokens, list(prompts)]).encode("utf-8"))
    return digest.hexdigest()[:16]


def write_jsonl(file: Path, rows: Sequence[dict]) -> None:
    """Atomic: a kill leaves the old file or none, never half a shard."""
    partial = file.with_name(f".{file.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, file)


def read_shard(file: Path, key: str) -> Optional[List[dict]]:
    """A shard's rows, or None when it is missing or was written for other prompts, another target or length."""
    try:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return None
    return rows[1:] if rows and rows[0].get("key") == key else None


def generated_examples(
    model,
    tokenizer,
    records: Sequence[Record],
    folder: Path,
    model_id: str,
    max_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] = lambda done: None,
) -> Iterator[Example]:
    """Yield one Example per record, the response greedy from the target; shards already on disk are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(records), SHARD_SIZE):
        chunk = records[first : first + SHARD_SIZE]
        prompts = [prompt_ids(tokenizer, record.prompt) for record in chunk]
        key = shard_key(model_id, [record.prompt for record in chunk], max_tokens)
        file = folder / f"responses-{first // SHARD_SIZE:05d}.jsonl"
        rows = read_shard(file, key)
        if rows is None:
            responses = greedy_batch(model, tokenizer, prompts, max_tokens, batch_size)
            rows = [{"prompt": r.prompt, "response_ids": ids} for r, ids in zip(chunk, responses)]
            write_jsonl(file, [{"key": key}] + rows)
        for ids, row in zip(prompts, rows):
            yield Example(ids + row["response_ids"], len(ids))
        progress(len(chunk))


def greedy_batch(model, tokenizer, prompts: List[List[int]], max_tokens: int, batch_size: int) -> List[List[int]]:
    """Greedy responses, each ending with its stop token when it stopped (the drafter learns to propose it)."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        stop_tokens=[[token] for token in tokenizer.eos_token_ids],
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    try:
        uids = generator.insert(prompts, [max_tokens] * len(prompts))
        tokens = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            for response in responses:
                tokens[response.uid].append(int(response.token))
    finally:
        generator.close()
    return [tokens[uid] for uid in uids]


def target_identity(folder: Path) -> str:
    """Names the target the cached responses came from: its config and the size of each weight file."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]
