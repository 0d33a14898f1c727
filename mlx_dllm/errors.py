class DLLMError(ValueError):
    """An error the user caused (bad path, config, flag or shape); its message is one line."""


def first_line(error: BaseException) -> str:
    """An error's first line for a one-line DLLMError (its type's name when it has no message)."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__
