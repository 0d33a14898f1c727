"""Prompt-cache reuse across calls: `stream_generate(..., prompt_cache=PromptCache())`.

A call whose prompt starts with the tokens of an earlier call's state (its prompt, or its prompt and the tokens it
generated) resumes from the longest usable one and prefills only the rest. States live in mlx-lm's `LRUPromptCache`,
keyed by the model, the drafter and the mode, and by the tokens the state holds. An entry is a list of parts with
`nbytes`, `is_trimmable()` and `trim(n)`: the layer caches themselves, so a plain K/V prefix trims to a shorter one,
as in mlx_lm.server.

What a mode keeps (its strategy takes a `PromptState` as `prompt_state`):

- ar, linear-spec, quadratic-spec, Nemotron's diffusion, DiffusionGemma's diffusion: the model's layer caches (K/V,
  sliding windows, recurrent states). A recurrent state resumes only where it was stored and a window stops trimming
  once it has dropped a row, so every state but a plain K/V one is also stored at the prompt's end: the next turn of
  a conversation, whose prompt extends the last prompt but rarely the tokens generated after its end of turn, finds
  that exact state.
- dflash: also the drafter's context cache and the target features of the rows it has not read yet (`DraftState`),
  so that resuming and prefilling the rest gives the drafter exactly the rows it would have read. The entry is
  untrimmable (trimming would have to cut the unread rows and the drafter's in step), so it is stored at the
  prompt's end too.
- Nemotron's diffusion with causal_context=False runs without reuse: it encodes the prompt bidirectionally, so the
  state of a prefix is not a prefix of the prompt's state.

Batched ar and dflash rows (sampler/batch.py, `insert(prompt_state=...)`) resume and leave these same states under the
same keys: a row's state is taken out of the batch's caches as the one-row caches its mode holds alone.

The last prompt token is always prefilled: its logits choose the first token, and an entry holds no logits. A
repeated prompt thus finds a K/V entry trimmed by a token or two, and none where the entry is untrimmable.
A prefill draws no random numbers, so a resumed call draws what a cold one draws: greedy or seeded, it generates the
same tokens (tests/test_prompt_cache.py).
"""

import copy
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache

DEFAULT_SIZE = 10  # entries, as mlx_lm.server's --prompt-cache-size


class DraftState:
    """A DFlash drafter's part of an entry: its context caches and the target features [1, rows, F] of the rows the
    target holds but the drafter has not read (None: it has read them all)."""

    def __init__(self, caches: List, unread: Optional[mx.array]):
        self.caches, self.unread = caches, unread

    @property
    def state(self):
        return [cache.state for cache in self.caches], self.unread

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches) + (0 if self.unread is None else self.unread.nbytes)

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0


def plain_prefix(entry: List) -> bool:
    """Whether the entry trims to any shorter prefix however long it grows: K/V caches that keep every row."""
    return all(isinstance(part, KVCache) for part in entry)


class PromptState:
    """One call's link to a PromptCache: the state it resumes and the states it leaves.

    A strategy builds its caches from `resume()` (None: start fresh), prefills `prompt[start:]`, calls
    `prompt_end(entry)` once the prompt is in and `leave(generated, entry)` when it stops, `generated` being the
    tokens after the prompt that the entry holds. Without a cache (`PromptState()`) it resumes nothing and keeps
    nothing."""

    def __init__(self, cache: Optional["PromptCache"] = None, key=None, prompt: List[int] = (), entry=None,
                 start: int = 0):
        self.cache, self.key, self.prompt = cache, key, list(prompt)
        self._entry, self._start, self.resumed = entry, start, False
        self.left = []  # (tokens, entry), stored once the call ends cleanly

    @property
    def start(self) -> int:
        """Prompt tokens the resumed state holds (the cached tokens), 0 until a strategy resumes it."""
        return self._start if self.resumed else 0

    def resume(self) -> Optional[List]:
        self.resumed = self._entry is not None
        return self._entry

    def prompt_end(self, entry: List) -> None:
        """The state after the whole prompt, kept (copied: the strategy goes on writing it) unless it is a plain K/V
        prefix, which the generation's end trims back to."""
        if self.cache is not None and not plain_prefix(entry):
            self.left.append((self.prompt, copy.deepcopy(entry)))

    def leave(self, generated: List[int], entry: List) -> None:
        if self.cache is not None:
            self.left.append((self.prompt + list(generated), entry))

    def store(self) -> None:
        """Put what the call left into its cache (the front calls this after a call that did not fail)."""
        if self.cache is not None:
            for tokens, entry in self.left:
                self.cache.insert(self.key, tokens, entry)
        self.left = []


NO_REUSE = PromptState()  # a call without a prompt cache: it resumes nothing and keeps nothing


class PromptCache:
    """Decoding states kept across calls (see the module's docstring), at most `max_size` entries and `max_bytes`
    bytes, evicted least recently used first (mlx-lm's LRUPromptCache). The models it has seen stay alive while it
    does: its keys hold their ids."""

    def __init__(self, max_size: int = DEFAULT_SIZE, max_bytes: Optional[int] = None):
        self.lru = LRUPromptCache(max_size, (1 << 63) if max_bytes is None else max_bytes)
        self._models = {}

    def key(self, model, draft_model, mode: str):
        for held in (model, draft_model):
            self._models[id(held)] = held
        return id(model), id(draft_model), mode

    def begin(self, model, draft_model, mode: str, prompt: List[int]) -> PromptState:
        """The call's PromptState, resuming the longest usable entry for `prompt` (its last token stays to prefill)."""
        key = self.key(model, draft_model, mode)
        entry, rest = self.lru.fetch_nearest_cache(key, prompt[:-1])
        return PromptState(self, key, prompt, entry, len(prompt) - 1 - len(rest))

    def insert(self, key, tokens: List[int], entry: List) -> None:
        mx.eval([part.state for part in entry])  # no lazy graph keeps more alive than the entry's bytes say
        self.lru.insert_cache(key, tokens, entry)

    def __len__(self) -> int:
        return len(self.lru)

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes

