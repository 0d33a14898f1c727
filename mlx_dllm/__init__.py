"""mlx-dllm: diffusion language models on Apple silicon with MLX."""

from ._version import __version__
from .errors import DLLMError
from .loading import load
from .sampler import GenerationResponse, generate, stream_generate
from .convert import convert  # noqa: E402  (after loading: the converter uses it)

__all__ = ["DLLMError", "GenerationResponse", "__version__", "convert", "generate", "load", "stream_generate"]
