"""mlx-dllm: diffusion language models on Apple silicon with MLX."""

from ._version import __version__
from .errors import DLLMError
from .loading import load
from .sampler import GenerationResponse, generate, stream_generate


def convert(*args, **kwargs):
    """HF checkpoint -> MLX folder; see `mlx_dllm.convert.convert`."""
    from .convert import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["DLLMError", "GenerationResponse", "__version__", "convert", "generate", "load", "stream_generate"]
