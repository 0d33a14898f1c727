"""The share of wall time spent outside model forwards (selection, acceptance, rollback, detokenizing, Python),
from a separate run in which every forward is evaluated on the spot and timed."""

import time
from contextlib import contextmanager
from typing import Callable, List, Tuple

import mlx.core as mx
import mlx.nn as nn

FORWARD_METHODS = ("__call__", "encode", "denoise", "embed", "lm_head")


class ForwardTimer:
    """Times model calls, each evaluated synchronously; a call inside a timed one counts once."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, call: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.depth:
                return call(*args, **kwargs)
            mx.eval([a for a in args if isinstance(a, mx.array)])  # pending sampler work stays outside
            self.depth += 1
            start = time.perf_counter()
            try:
                out = call(*args, **kwargs)
                mx.eval(out)
            finally:
                self.depth -= 1
            self.seconds += time.perf_counter() - start
            return out

        return timed


def forward_owners(*models) -> List[Tuple[type, str]]:
    """(class, method) pairs that run forwards: the models' own, the DFlash target adapter's, and nn.Linear for
    heads a strategy calls on its own (Nemotron's quadratic verify)."""
    from ..models.target import Target

    classes = [type(m) for m in models if m is not None] + [Target, nn.Linear]
    return [(cls, name) for cls in dict.fromkeys(classes) for name in FORWARD_METHODS if name in cls.__dict__]


@contextmanager
def timed_forwards(timer: ForwardTimer, owners: List[Tuple[type, str]]):
    saved = [(cls, name, cls.__dict__[name]) for cls, name in owners]
    for cls, name, original in saved:
        setattr(cls, name, timer.wrap(original))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def outside_share(run: Callable, model, draft) -> float:
    """1 - forward time / wall time of one instrumented call of `run()`."""
    timer = ForwardTimer()
    with timed_forwards(timer, forward_owners(model, draft)):
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    return max(0.0, 1.0 - timer.seconds / wall)
