"""The unified sampler: one module per strategy and the shared front (`front.py`)."""

from .common import GenerationResponse
from .diffusion import DiffusionSettings
from .front import generate, stream_generate, summary

__all__ = ["DiffusionSettings", "GenerationResponse", "generate", "stream_generate", "summary"]
