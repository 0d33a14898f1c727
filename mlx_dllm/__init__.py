"""mlx-dllm: diffusion language models on Apple silicon with MLX.

`import mlx_dllm` is instant: MLX, mlx-lm, transformers and the converter load on first use of the API, so the
CLI answers `--help` at once and handles Ctrl-C during those imports like any later Ctrl-C.
"""

import importlib
import sys
import types

from ._version import __version__
from .errors import DLLMError

_LAZY = {
    "load": "loading",
    "generate": "sampler",
    "stream_generate": "sampler",
    "GenerationResponse": "sampler",
    "PromptCache": "sampler",
    "convert": "convert",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the subpackage binds it here as `convert`; the public name stays its function.
        if name == "convert" and isinstance(value, types.ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["DLLMError", "GenerationResponse", "PromptCache", "__version__", "convert", "generate", "load",
           "stream_generate"]
