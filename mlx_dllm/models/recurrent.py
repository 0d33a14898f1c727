"""Rollback of recurrent layers (Gated DeltaNet, Mamba-2, short convolutions) by replaying the kept prefix.

mlx-lm keeps a recurrent layer's state in an `ArraysCache`: slot 0 holds the last K-1 inputs of its causal
convolution, slot 1 (Gated DeltaNet, Mamba-2) the recurrence state. During a verify each marked layer records
the input of its convolution and the arguments of its recurrence call; keeping n tokens then sets the
convolution window to rows n..n+K-2 of that input and re-runs the recurrence over the first n tokens from the
state before the verify. The replay reads only the recorded tensors: no projection runs again, and no state is
stored per position (see `benchmarks/recurrent_rollback.py` for both costs).
"""

import inspect
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import DLLMError


@dataclass(frozen=True)
class Recurrence:
    """An mlx-lm recurrence function, called by name from its model module: `(outputs, state) = f(...)`."""

    name: str
    per_token: Tuple[str, ...]  # arguments with one row per token, cut to the kept prefix on replay


# The recurrences of mlx-lm's hybrid families: qwen3_5, qwen3_5_moe, qwen3_next (GDN) and nemotron_h (Mamba-2).
RECURRENCES = (
    Recurrence("gated_delta_update", ("q", "k", "v", "a", "b", "mask")),
    Recurrence("ssm_update", ("hidden_states", "B", "C", "dt", "mask")),
)


def recurrent_mixers(layers: List) -> List[Tuple[nn.Module, str, Optional[Recurrence]]]:
    """(module, name of its Conv1d, its recurrence or None) for every convolution mixer of `layers`, in order."""
    mixers = []
    for layer in layers:
        modules = dict(layer.named_modules())
        for path, module in modules.items():
            if isinstance(module, nn.Conv1d):
                parent_path, _, name = path.rpartition(".")
                parent = modules[parent_path]
                namespace = vars(sys.modules[type(parent).__module__])
                known = [r for r in RECURRENCES if r.name in namespace]
                mixers.append((parent, name, known[0] if known else None))
    return mixers


# One recording at a time: the recurrence functions are module globals, swapped for the duration of a forward.
_RECORD_LOCK = threading.RLock()


class _ConvRecorder:
    """Stands in for a mixer's Conv1d during one forward and records its input (the window, then the tokens)."""

    def __init__(self, conv: nn.Module, rollback: "RecurrentRollback"):
        self.conv, self.rollback = conv, rollback

    def __call__(self, x):
        self.rollback.conv_input = x
        return self.conv(x)

    def __getattr__(self, name):
        return getattr(self.conv, name)


class _RecurrenceRecorder:
    """Stands in for a module's recurrence function; records the call whose state is a marked layer's state."""

    def __init__(self, function: Callable, recurrence: Recurrence, rollbacks: List["RecurrentRollback"]):
        self.function, self.recurrence, self.rollbacks = function, recurrence, rollbacks
        self.signature, self.thread = inspect.signature(function), threading.get_ident()

    def __call__(self, *args, **kwargs):
        if threading.get_ident() == self.thread:
            bound = self.signature.bind(*args, **kwargs)
            state = bound.arguments.get("state")
            for rollback in self.rollbacks:
                if rollback.saved is not None and state is rollback.saved[1]:
                    rollback.replay = (self.function, self.recurrence, dict(bound.arguments))
        return self.function(*args, **kwargs)


class RecurrentRollback:
    """Rollback of one recurrent layer's ArraysCache (see the module docstring)."""

    def __init__(self, cache, mixer: nn.Module, conv_name: str, recurrence: Optional[Recurrence]):
        self.mixer, self.conv_name = mixer, conv_name
        self.cache, self.recurrence = cache, recurrence
        self.saved = self.conv_input = self.replay = None

    @property
    def armed(self) -> bool:
        return self.saved is not None

    def mark(self) -> None:
        if self.cache.cache[0] is None:
            raise DLLMError("a recurrent layer is marked before its first forward (prefill first)")
        self.saved = list(self.cache.cache)  # MLX arrays are immutable: keeping them costs nothing
        self.conv_input = self.replay = None

    @contextmanager
    def recording(self):
        """Around one forward: the mixer's convolution and recurrence record their inputs here."""
        mixer, name = self.mixer, self.conv_name
        conv = mixer[name]
        with _RECORD_LOCK, _recurrence_recorded(mixer, self):
            mixer[name] = _ConvRecorder(conv, self)
            try:
                yield
            finally:
                mixer[name] = conv

    def keep_path(self, path) -> None:
        raise DLLMError("a recurrent layer keeps a prefix of the verified tokens, not a path of a tree")

    def keep(self, n: int) -> None:
        if self.saved is None:
            raise DLLMError("a recurrent layer is asked to keep tokens without a mark")
        saved, conv_input, replay = self.saved, self.conv_input, self.replay
        self.saved = self.conv_input = self.replay = None
        if n == 0:
            self.cache.cache = saved
            return
        if conv_input is None or (self.recurrence is not None and replay is None):
            raise DLLMError("a recurrent layer was verified without recording its inputs (use the target's forward)")
        window = saved[0].shape[1]
        if n == conv_input.shape[1] - window:
            return  # everything verified is kept: the forward's own state is right
        self.cache[0] = mx.contiguous(conv_input[:, n : n + window])
        if replay is not None:
            self.cache[1] = _replay(replay, n)


def _replay(replay, n: int) -> mx.array:
    function, recurrence, arguments = replay
    arguments = dict(arguments)
    for name in recurrence.per_token:
        if arguments.get(name) is not None:
            arguments[name] = arguments[name][:, :n]
    return function(**arguments)[1]


@contextmanager
def _recurrence_recorded(parent: nn.Module, rollback: RecurrentRollback):
    """Swap the recurrence function in the mixer's module for a recorder, for the duration of one forward."""
    if rollback.recurrence is None:
        yield
        return
    namespace = vars(sys.modules[type(parent).__module__])
    name = rollback.recurrence.name
    current = namespace[name]
    if isinstance(current, _RecurrenceRecorder):  # another layer of the same module already swapped it
        current.rollbacks.append(rollback)
        yield
        return
    namespace[name] = _RecurrenceRecorder(current, rollback.recurrence, [rollback])
    try:
        yield
    finally:
        namespace[name] = current
