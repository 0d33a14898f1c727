"""`mlx-dllm serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) for every family and mode.

One model lives in one worker thread, which runs one generation at a time; requests wait in a bounded queue.
"""
