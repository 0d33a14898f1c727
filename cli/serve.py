"""`mlx-dllm serve`: an OpenAI-compatible server; flags follow `mlx_lm.server` where they overlap."""

import click

from mlx_dllm.default_model import NAME
from mlx_dllm.errors import DLLMError

from .generate import choose_drafter

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Size(click.ParamType):
    """A byte count as mlx_lm.server's --prompt-cache-bytes reads it: digits, then nothing, M, MB, G or GB."""

    name = "size"

    def convert(self, value, param, ctx):
        from mlx_lm.utils import _parse_size

        try:
            return _parse_size(str(value))
        except (ArithmeticError, KeyError, ValueError):  # decimal.InvalidOperation is an ArithmeticError
            self.fail(f"{value!r} is not a size such as 500000, 500M or 8GB", param, ctx)


@click.command("serve")
@click.option("--model", default=None,
              help="Model folder or hub repo id (default, or 'default': SmolLM2-135M-Instruct).")
@click.option("--draft-model", default=None,
              help="DFlash drafter folder or hub repo id (default model: its shipped drafter; 'none': plain AR).")
@click.option("--no-draft", is_flag=True, help="No drafter, not even the default model's.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--api-key", default=None, envvar="MLX_DLLM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health (env MLX_DLLM_API_KEY).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens a request gets by default, and the most it may ask for.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests that may wait for the model; more get 429.")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=10, show_default=True,
              help="Prompt states kept to resume requests that extend an earlier one (0: none).")
@click.option("--prompt-cache-bytes", type=Size(), default=None,
              help="Most bytes those states may take, e.g. 8GB (default: no limit).")
@click.option("--decode-concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests decoded together in one batch (ar and dflash chains; 1: one at a time).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve_command(model, draft_model, no_draft, host, port, api_key, max_tokens, max_body_bytes, max_queue,
                  prompt_cache_size, prompt_cache_bytes, decode_concurrency, log_level):
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    from mlx_dllm.loading import load_pair
    from mlx_dllm.server.app import Settings
    from mlx_dllm.server.run import build, listen, model_names, uvicorn_server
    from mlx_dllm.server.worker import Loaded

    if api_key is not None and not api_key.strip():
        raise DLLMError("--api-key must not be empty")
    draft = choose_drafter(model, draft_model, no_draft, None)
    sock = listen(host, port)  # a port in use fails now, before the model loads
    if host not in LOCAL_HOSTS:
        click.echo(f"[WARNING] Listening on {host}: other machines can reach this server"
                   f"{'' if api_key else '; set --api-key'}.", err=True)
    path = NAME if model is None else model
    names = model_names(path)

    def load():
        return Loaded(*load_pair(path, draft), name=names[0], aliases=tuple(names[1:]))

    try:
        settings = Settings(max_tokens, max_body_bytes, api_key, prompt_cache_size, prompt_cache_bytes,
                            decode_concurrency)
        app, worker = build(load, settings, max_queue)
        bound = sock.getsockname()
        click.echo(f"[INFO] Serving {path} on http://{bound[0]}:{bound[1]}/v1", err=True)
        try:
            uvicorn_server(app, log_level).run(sockets=[sock])
        finally:
            worker.stop()
    finally:
        sock.close()
