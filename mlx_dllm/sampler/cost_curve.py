"""What a speculative round costs on this machine: the target's forward time against the tokens it verifies, and the
drafter's forward time, measured once per model pair (or self-drafting model) and machine and kept under the user's
cache folder.

Adaptive speculation weighs expected tokens against these seconds, so the shape of the curve is what matters: how
much a 16-token verify costs over a 1-token one (about 2x on a 2-core CPU, close to 1x on a Mac GPU for a small
model). The key holds what the times depend on (parameter shapes and dtypes, not their values; the backend, its
device, the BLAS, the library versions), so another checkpoint of the same architecture reuses the curve. A curve
older than `STALE_AFTER_S` is measured again.
"""

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from itertools import accumulate
from typing import Callable, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .._version import __version__
from ..configs import write_json
from ..default_model import cache_root
from ..kernels.routing import current_backend

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # verify tokens measured; between them the curve is linear
CONTEXT = 128  # cache rows behind the measured forwards: a short prompt's
REPEATS = 3  # timed forwards per size, after one warm-up; the fastest is kept (other work only adds time)
STALE_AFTER_S = 30 * 24 * 3600
FOLDER_VARIABLE = "MLX_DLLM_COST_CURVES"  # another folder for the curves (tests use one of their own)


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one target forward over `sizes[i]` tokens (`seconds[i]`), and of one drafter forward."""

    sizes: Tuple[int, ...]
    seconds: Tuple[float, ...]
    draft_seconds: float

    def verify(self, tokens: int) -> float:
        """Seconds of a target forward over `tokens` tokens: linear between measured sizes, and past the last one
        along the last segment's slope."""
        sizes, seconds = self.sizes, self.seconds
        if len(sizes) == 1:
            return seconds[0] * tokens / sizes[0]
        upper = next((i for i, size in enumerate(sizes) if size >= tokens), len(sizes) - 1)
        lower = max(upper - 1, 0)
        upper = max(upper, 1)
        slope = (seconds[upper] - seconds[lower]) / (sizes[upper] - sizes[lower])
        return max(seconds[lower] + slope * (tokens - sizes[lower]), 0.0)


def folder() -> Path:
    return Path(os.environ.get(FOLDER_VARIABLE) or cache_root() / "cost-curves")


def _architecture(model: nn.Module) -> list:
    return [(name, tuple(p.shape), str(p.dtype)) for name, p in tree_flatten(model.parameters())]


def curve_key(target: nn.Module, draft: Optional[nn.Module] = None, *details) -> str:
    """What a curve's times depend on, hashed: without a `draft` the target drafts for itself (self-speculation);
    `details` are the run's own (e.g. the drafter's block)."""
    info = mx.device_info()
    described = {
        "versions": [__version__, mx.__version__],
        "machine": [platform.system(), platform.machine(), os.cpu_count(), current_backend(),
                    str(info.get("device_name", "")), str(info.get("architecture", "")),
                    os.environ.get("LD_PRELOAD", "")],
        "target": [type(target).__module__, _architecture(target)],
        "draft": None if draft is None else [type(draft).__module__, _architecture(draft)],
        "details": list(details),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def _timed(run: Callable[[], None]) -> float:
    run()  # warm-up: kernels compiled, buffers allocated
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(verify: Callable[[int], None], draft: Callable[[], None], sizes: Sequence[int]) -> CostCurve:
    """Time `verify(n)` (one target forward over n tokens, evaluated) for each size and `draft()`. A forward over
    more tokens never costs less, and other work only adds time: a size that measured slower than a larger one was
    disturbed, and takes the larger one's time (raising the larger ones instead would let one busy moment inflate
    the whole curve)."""
    measured = [_timed(lambda: verify(n)) for n in sizes]
    seconds = tuple(accumulate(reversed(measured), min))[::-1]
    return CostCurve(tuple(sizes), seconds, _timed(draft))


def _read(file: Path, largest: int) -> Optional[CostCurve]:
    try:
        saved = json.loads(file.read_text())
        fresh = time.time() - float(saved["measured_at"]) < STALE_AFTER_S
        curve = CostCurve(tuple(int(s) for s in saved["sizes"]), tuple(float(s) for s in saved["seconds"]),
                          float(saved["draft_seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or not ours to trust: measured again and replaced
    covers = len(curve.sizes) == len(curve.seconds) > 0 and curve.sizes[-1] >= largest
    return curve if fresh and covers else None


def cost_curve(key: str, largest: int, timing: Callable[[Sequence[int]], CostCurve]) -> CostCurve:
    """The curve saved under `key` when fresh and measured up to `largest` tokens; else `timing(sizes)`, saved."""
    file = folder() / f"{key}.json"
    curve = _read(file, largest)
    if curve is not None:
        return curve
    curve = timing([size for size in SIZES if size < largest] + [largest])
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {"measured_at": time.time(), "sizes": list(curve.sizes), "seconds": list(curve.seconds),
                          "draft_seconds": curve.draft_seconds})
    except OSError:
        pass  # a read-only cache folder: measured again next time, nothing else lost
    return curve
