"""`--decode-concurrency N` > 1: the worker's loop around one BatchEngine (sampler/batch.py).

Queued requests join between rounds while the batch holds fewer than N; each round is one `engine.step()`, and each
row's new tokens go out to its request at once, as responses built by the front's `Responder` (the one-at-a-time
path's: the same text, stop strings, finish reasons and stats). A finished row leaves; a row whose client has gone is
dropped before the next round (`engine.cancel`) and the others go on undisturbed.

A request the engine cannot batch runs alone through `stream_generate`, as with N = 1, once the running rows have
finished; no request joins meanwhile, so requests still start in arrival order. That is one pinning
speculation='tree' or a tree_budget, one with another mode's options, or any the engine's checks refuse (the front
then answers it as today, its error included). A DFlash request with speculation 'auto' (the default) is an adaptive
row of the batch, verifying chains of the batch's width: its greedy text is the same as alone (sampled, the same
distribution with other draws; ar and chain rows draw what they would alone).

Batched rows use the worker's prompt cache as requests run alone do, under the same keys: a row resumes the state an
earlier request (batched or alone) left for its prompt's prefix, its usage counting the cached tokens, and leaves its
own when it finishes (at a stop token, max_tokens or a stop string; a row that fails or whose client has gone leaves
nothing). A model whose modes are not ar/dflash (Nemotron, DiffusionGemma) and a recurrent target, which the engine
refuses, run every request alone.
"""

import logging
import queue
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from mlx_lm.generate import generation_stream, wired_limit

from ..errors import DLLMError
from ..sampler.arguments import encode_prompt, stop_strings
from ..sampler.batch import BatchEngine
from ..sampler.common import NOT_FINITE_MESSAGE, GenerationResponse
from ..sampler.dflash import block_size_option
from ..sampler.front import Responder
from ..sampler.mode import TARGET_MODES, modes_of
from ..sampler.prompt_cache import NO_REUSE, PromptCache
from .worker import Event, Handle, Loaded

log = logging.getLogger("mlx_dllm.server")


@dataclass
class Row:
    """A batched request: where its responses go, what builds them, and the last one sent."""

    handle: Handle
    responder: Responder
    last: Optional[GenerationResponse] = None


def make_batcher(loaded: Loaded, max_rows: int, jobs: queue.Queue, serve_alone: Callable[[Handle], None],
                 on_finish: Callable, prompt_cache: Optional[PromptCache] = None) -> Optional["Batcher"]:
    """The batch loop, or None (with a warning) for a model whose requests cannot be batched."""
    if set(modes_of(loaded.model)) != set(TARGET_MODES):
        log.warning("--decode-concurrency: this model's modes are not batched; its requests run one at a time")
        return None
    try:
        return Batcher(loaded, max_rows, jobs, serve_alone, on_finish, prompt_cache)
    except DLLMError as refused:  # a recurrent target
        log.warning("--decode-concurrency: %s", refused)
        return None


class Batcher:
    def __init__(self, loaded: Loaded, max_rows: int, jobs: queue.Queue, serve_alone: Callable[[Handle], None],
                 on_finish: Callable, prompt_cache: Optional[PromptCache] = None):
        self.loaded, self.max_rows, self.prompt_cache = loaded, max_rows, prompt_cache
        self.jobs, self.serve_alone, self.on_finish = jobs, serve_alone, on_finish
        self.modes = modes_of(loaded.model)
        self.engine = self.new_engine()
        self.rows: Dict[int, Row] = {}  # engine uid -> its request

    def new_engine(self) -> BatchEngine:
        return BatchEngine(self.loaded.model, self.loaded.tokenizer, self.loaded.draft_model, max_rows=self.max_rows)

    def run(self) -> None:
        """Until the worker stops: take queued requests while there is room, then one round for every row; a
        request that must run alone waits for the rows to finish."""
        alone, stopping = None, False
        with wired_limit(self.loaded.model, [generation_stream]):
            while True:
                while alone is None and not stopping and len(self.rows) < self.max_rows:
                    try:
                        handle = self.jobs.get(block=not self.rows)  # idle: wait for one
                    except queue.Empty:
                        break
                    if handle is None:
                        stopping = True
                    else:
                        alone = self._join(handle)
                self._drop_cancelled()
                if self.rows:
                    self._step()
                elif alone is not None:
                    self.serve_alone(alone)
                    alone = None
                elif stopping:
                    return

    def _join(self, handle: Handle) -> Optional[Handle]:
        """Queue the request in the engine; it comes back where it must run alone."""
        if handle.cancelled.is_set():  # its client left while it waited
            self.on_finish(None, None, True)
            return None
        try:
            uid, responder = self._insert(handle.job.prompt, dict(handle.job.options))
        except DLLMError:  # what the engine cannot batch, or refuses: the front runs it, or answers it as today
            return handle
        self.rows[uid] = Row(handle, responder)
        return None

    def _insert(self, prompt, options: dict):
        """(the row's uid, its Responder): the stream_generate options split into the engine's and the text's."""
        engine = self.engine
        max_tokens = options.pop("max_tokens", 256)  # stream_generate's default
        stops = stop_strings(options.pop("stop", ()))
        block_size = block_size_option(options.pop("block_size", None), options.pop("num_draft_tokens", None))
        if block_size is not None:
            options["block_size"] = block_size
        ids = encode_prompt(engine.tokenizer, prompt, engine.vocab_rows).tolist()
        mode = options.get("mode") or ("ar" if engine.draft is None else "dflash")
        state = NO_REUSE
        if self.prompt_cache is not None:  # a lone run's key: the same model, drafter and mode
            state = self.prompt_cache.begin(self.loaded.model, self.loaded.draft_model, mode, ids)
        uid = engine.insert(ids, max_tokens, options, state)
        return uid, Responder(engine.tokenizer, self.modes[mode], len(ids), max_tokens, engine.eos_ids, stops, state)

    def _drop_cancelled(self) -> None:
        for uid in [uid for uid, row in self.rows.items() if row.handle.cancelled.is_set()]:
            self._end(uid)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as failure:  # no row to blame: every row gets it, and a fresh engine serves the next ones
            log.exception("batched generation failed")
            self.engine = self.new_engine()
            for uid in list(self.rows):
                self._end(uid, failure)
            return
        for event in events:
            self._deliver(event)

    def _deliver(self, event) -> None:
        """A row's new tokens to its request as one response; a row that has ended leaves."""
        row, error = self.rows[event.uid], None
        try:
            if event.finished == "error":
                raise DLLMError(NOT_FINITE_MESSAGE)  # the front's error, for this request only
            row.last = row.responder.add(event.tokens, event.stats, event.finished)
            row.handle.send(Event("response", row.last))
            if row.last.finish_reason is None:
                return
        except DLLMError as failure:
            error = failure
        except Exception as failure:  # the server keeps serving; the client gets a 500 without the traceback
            log.exception("generation failed")
            error = failure
        self._end(event.uid, error)

    def _end(self, uid: int, error: Optional[BaseException] = None) -> None:
        """The request is done: out of the batch (a stop string, a failure or a cancel leaves its row running; only a
        stop string's keeps its state), counted, told."""
        row = self.rows.pop(uid)
        cancelled = row.handle.cancelled.is_set()
        if error is None and not cancelled:
            self.engine.finish(uid)
        else:
            self.engine.cancel(uid)
        # Counted before the client hears the end: its reply's own cleanup must not read as a cancel.
        self.on_finish(row.last, error, cancelled)
        row.handle.send(Event("error", error) if error is not None else Event("done"))
