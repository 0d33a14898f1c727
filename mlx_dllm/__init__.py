"""mlx-dllm: diffusion language models on Apple silicon with MLX.

`import mlx_dllm` is instant: MLX, mlx-lm and transformers load on first use of the API, so the CLI answers
`--help` at once and handles Ctrl-C during those imports like any later Ctrl-C.
"""

import importlib

from ._version import __version__
from .convert import convert  # the package imports its recipes on first call
from .errors import DLLMError

_LAZY = {"load": "loading", "generate": "sampler", "stream_generate": "sampler", "GenerationResponse": "sampler"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["DLLMError", "GenerationResponse", "__version__", "convert", "generate", "load", "stream_generate"]
