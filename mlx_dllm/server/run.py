"""Start the worker, build the app and serve it with uvicorn on a socket bound before anything loads."""

import socket
from pathlib import Path
from typing import Callable, List

from ..default_model import HUB_REPO, NAME, names_default
from ..errors import DLLMError
from ..sampler.prompt_cache import PromptCache
from .app import Settings, create_app
from .metrics import Metrics
from .worker import Loaded, Worker


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why not (a port in use is the usual reason)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        raise DLLMError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def model_names(path_or_repo: str) -> List[str]:
    """The served model's names for /v1/models: as given to --model and, for a local folder, as mlx_lm.server
    lists it (its absolute path) and by the folder's own name; the default model by its name, `default` and hub id."""
    if names_default(path_or_repo):
        return [HUB_REPO.rpartition("/")[2], NAME, HUB_REPO]
    names = [path_or_repo]
    folder = Path(path_or_repo)
    if folder.is_dir():
        names += [str(folder.resolve()), folder.resolve().name]
    return list(dict.fromkeys(names))


def build(load: Callable[[], Loaded], settings: Settings, max_queue: int):
    """(app, worker): the model is loaded, in the worker thread, when this returns."""
    metrics = Metrics()
    size = settings.prompt_cache_size
    prompt_cache = PromptCache(size, settings.prompt_cache_bytes) if size else None  # 0: no copies kept at all
    worker = Worker(load, max_queue, metrics.finished, prompt_cache, settings.decode_concurrency)
    return create_app(worker, worker.start(), settings, metrics), worker


def uvicorn_server(app, log_level: str = "info"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
