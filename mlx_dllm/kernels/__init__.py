"""Attention for every model file: one entry point, a pattern object instead of a mask, a Metal block kernel."""

from . import patterns
from .attention import attention, masked_attention

__all__ = ["attention", "masked_attention", "patterns"]
