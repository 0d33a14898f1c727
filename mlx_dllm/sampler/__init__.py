"""The unified sampler: one module per strategy and the shared front (`front.py`)."""

from .common import GenerationResponse
from .diffusion import DiffusionSettings
from .front import generate, stream_generate, summary
from .prompt_cache import PromptCache

__all__ = ["DiffusionSettings", "GenerationResponse", "PromptCache", "generate", "stream_generate", "summary"]
