from .attention import attention

__all__ = ["attention"]
