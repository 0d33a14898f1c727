"""The one thread that owns the model: it loads it, then runs queued jobs in order, one at a time, or with
`decode_concurrency` N > 1 up to N together in one BatchEngine (server/batching.py).

Requests reach it through `submit`, which refuses at once when the queue is full. Each job streams its
responses back to the event loop of the request that asked for it; a job whose client has gone (`cancel`)
stops at its next chunk and frees the model for the next one. Every job, run alone or batched, resumes from and adds
to the one prompt cache (sampler/prompt_cache.py), which only this thread touches.
"""

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..errors import DLLMError

log = logging.getLogger("mlx_dllm.server")


class QueueFull(Exception):
    pass


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    draft_model: Any = None
    name: str = "mlx-dllm"  # the replies' model
    aliases: Tuple[str, ...] = ()  # other names /v1/models lists for it


@dataclass
class Job:
    """What one request asks `stream_generate` for: a prompt (text or ids) and its keyword arguments."""

    prompt: Union[str, List[int]]
    options: Dict[str, Any]


@dataclass
class Event:
    kind: str  # "response", "error" (value: the exception) or "done"
    value: Any = None


@dataclass
class Handle:
    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone: nobody is listening
            self.cancel()


class Worker:
    def __init__(self, load: Callable[[], Loaded], max_queue: int, on_finish: Callable = lambda *args: None,
                 prompt_cache=None, decode_concurrency: int = 1):
        self._load = load
        self._prompt_cache = prompt_cache
        self._concurrency = decode_concurrency
        self._jobs: "queue.Queue[Optional[Handle]]" = queue.Queue(maxsize=max_queue)
        self._on_finish = on_finish
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.loaded: Optional[Loaded] = None
        self._thread = threading.Thread(target=self._run, name="mlx-dllm-worker", daemon=True)

    def start(self) -> Loaded:
        """Load the model in the worker thread (MLX streams are per thread); raise its error here if it fails."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.loaded

    def stop(self) -> None:
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(job, loop)
        try:
            self._jobs.put_nowait(handle)
        except queue.Full:
            raise QueueFull from None
        return handle

    def _run(self) -> None:
        try:
            self.loaded = self._load()
        except BaseException as error:  # noqa: B036 - handed to the main thread, which reports it
            self._error = error
            return
        finally:
            self._ready.set()
        batcher = self._batcher()
        if batcher is not None:
            batcher.run()
            return
        while (handle := self._jobs.get()) is not None:
            self.serve(handle)

    def _batcher(self):
        """The loop around one BatchEngine for decode_concurrency > 1, or None: one job at a time."""
        if self._concurrency == 1:
            return None
        from .batching import make_batcher

        return make_batcher(self.loaded, self._concurrency, self._jobs, self.serve, self._on_finish, self._prompt_cache)

    def serve(self, handle: Handle) -> None:
        """Run one job by itself through `stream_generate` (none if its client left while it waited)."""
        from .. import stream_generate

        if handle.cancelled.is_set():
            self._on_finish(None, None, True)
            return
        last, error = None, None
        try:
            job = handle.job
            responses = stream_generate(self.loaded.model, self.loaded.tokenizer, job.prompt,
                                        draft_model=self.loaded.draft_model, prompt_cache=self._prompt_cache,
                                        **job.options)
            try:
                for last in responses:
                    handle.send(Event("response", last))
                    if handle.cancelled.is_set():
                        break
            finally:
                responses.close()  # a stopped generator releases its caches now, not at garbage collection
        except DLLMError as failure:
            error = failure
        except Exception as failure:  # the server keeps serving; the client gets a 500 without the traceback
            log.exception("generation failed")
            error = failure
        # Counted before the client hears the end: its reply's own cleanup must not read as a cancel.
        self._on_finish(last, error, handle.cancelled.is_set())
        handle.send(Event("error", error) if error is not None else Event("done"))
