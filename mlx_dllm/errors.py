class DLLMError(ValueError):
    """An error the user caused (bad path, config, flag or shape); its message is one line."""
