"""One engine, many HTTP clients: generations run one at a time, in arrival order, on a worker
thread; a client that goes away cancels its job.

A `Llama` has one KV cache and is not thread-safe, so the server never runs two generations at
once; interleaving requests token by token would re-evaluate each prompt at every switch. Jobs
therefore queue first-come first-served (fair in the sense that no request overtakes another) and
the worker runs each to its end or to its cancellation:

    job = engine.submit(lambda job: llm.create_completion(..., logits_processor=job.processor))
    kind, value = await job.next()      # "result" | "start" then "item"... | "end" | "error"
    job.cancel()                        # the client disconnected: stop within one token

Cancellation is checked inside the sampling step (a logits processor that raises), so even a
non-streamed generation, or a stretch of tokens that yields no text, stops at the next token.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .llama_cpp import LogitsProcessorList
from .telemetry import watch


class Cancelled(Exception):
    """Raised inside a generation whose client went away."""


class Job:
    def __init__(self, fn: Callable[["Job"], Any], loop: asyncio.AbstractEventLoop, label: str):
        self.fn, self.loop, self.label = fn, loop, label
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.processor = LogitsProcessorList([self._check])
        self.processor.observes_only = True  # never changes the scores: the decode stays pipelined

    def _check(self, input_ids, scores):
        if self.cancelled.is_set():
            raise Cancelled()
        return scores

    def cancel(self):
        self.cancelled.set()

    def emit(self, kind: str, value=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()

    async def next(self):
        return await self.events.get()


class EngineQueue:
    def __init__(self, llm, history: int = 256):
        self.llm = llm
        self.busy: Optional[str] = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        # One record per finished job, newest last: label, outcome, completion tokens, finish reason.
        self.history: deque = deque(maxlen=history)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="flashmoe-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, fn: Callable[[Job], Any], label: str = "") -> Job:
        job = Job(fn, asyncio.get_running_loop(), label)
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 10.0):
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self._record(job, "cancelled", None)
                job.emit("error", Cancelled())
                continue
            self.busy = job.label
            with watch() as w:
                outcome = self._execute(job, w)
            self.busy = None
            self._record(job, outcome, w)

    def _execute(self, job: Job, w) -> str:
        try:
            result = job.fn(job)
            if isinstance(result, dict):
                job.emit("result", result)
            else:
                job.emit("start")
                try:
                    for item in result:
                        job.emit("item", item)
                        if job.cancelled.is_set():
                            raise Cancelled()
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()  # an abandoned generator stops its generation here
            job.emit("end", dict(w.end or {}))  # usage of the generation (prompt/completion tokens)
            return "completed"
        except Cancelled:
            job.emit("error", Cancelled())
            return "cancelled"
        except Exception as e:  # reported to the client; the worker lives on
            job.emit("error", e)
            return "failed"

    def _record(self, job: Job, outcome: str, w):
        self.counts[outcome] += 1
        end = (w.end if w is not None else None) or {}
        self.history.append({"label": job.label, "outcome": outcome, "time": time.time(),
                             "completion_tokens": end.get("completion_tokens", w.tokens if w else 0),
                             "prompt_tokens": end.get("prompt_tokens"), "finish_reason": end.get("finish_reason")})
