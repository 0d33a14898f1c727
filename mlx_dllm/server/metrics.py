"""`GET /metrics`: what the server has done, per mode, since it started."""

import threading
import time
from collections import defaultdict
from typing import Dict


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()  # the worker writes, the event loop reads
        self._started = time.time()
        self._modes: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: Dict[str, int] = defaultdict(int)

    def count(self, name: str) -> None:
        """Requests refused before generating (queue_full, bad_request, unauthorized, ...)."""
        with self._lock:
            self._counts[name] += 1

    def finished(self, response, error, cancelled: bool) -> None:
        """One generation's totals, from its last response (which carries the running stats)."""
        with self._lock:
            if response is None:  # refused by the generation's own checks, or cancelled while queued
                self._counts["bad_request" if error is not None else "cancelled"] += 1
                return
            mode = self._modes[response.mode]
            mode["requests"] += 1
            mode["cancelled"] += cancelled
            mode["errors"] += error is not None
            mode["prompt_tokens"] += response.prompt_tokens
            mode["cached_tokens"] += response.cached_tokens
            mode["generation_tokens"] += response.generation_tokens
            mode["generation_seconds"] += response.generation_tokens / max(response.generation_tps, 1e-9)
            mode["forwards"] += response.forwards
            mode["decoded_tokens"] += response.tokens_per_forward * response.forwards
            if response.acceptance_length is not None:
                mode["acceptance_sum"] += response.acceptance_length
                mode["acceptance_requests"] += 1

    def snapshot(self) -> Dict:
        with self._lock:
            modes = {}
            for name, m in self._modes.items():
                modes[name] = {
                    "requests": int(m["requests"]),
                    "cancelled": int(m["cancelled"]),
                    "errors": int(m["errors"]),
                    "prompt_tokens": int(m["prompt_tokens"]),
                    "cached_tokens": int(m["cached_tokens"]),
                    "generation_tokens": int(m["generation_tokens"]),
                    "tokens_per_second": round(m["generation_tokens"] / m["generation_seconds"], 3)
                    if m["generation_seconds"] else None,
                    "tokens_per_forward": round(m["decoded_tokens"] / m["forwards"], 3) if m["forwards"] else None,
                    "acceptance_length": round(m["acceptance_sum"] / m["acceptance_requests"], 3)
                    if m["acceptance_requests"] else None,
                }
            return {"uptime_seconds": round(time.time() - self._started, 1), "refused": dict(self._counts),
                    "modes": modes}
