"""What the engine reports about the generation running on this thread, for the adapters.

`Llama` calls the plugin hooks `on_token(stats)` after every sampled token and
`on_generation_end(stats)` once per completion, on the thread that drives the generation. The
server (usage of streamed replies, proof that an abandoned generation stopped), the LangChain
classes (usage_metadata of streams) and the chat shell (its live toolbar) all need those figures
for one generation; `watch()` collects them for the calling thread only, so concurrent users of
different `Llama` objects never see each other's numbers.

    with watch() as w:
        for chunk in llm("Hi", stream=True): ...
    w.tokens, w.tokens_per_second, w.end["completion_tokens"]
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from flashmoe_plugin.hookspecs import hookimpl

_SUMMED = ("hits", "misses", "device_hits", "host_hits", "bytes_read", "bytes_copied", "read_seconds")


class GenerationWatch:
    """Running totals of one thread's generations while the watch is open."""

    def __init__(self, on_token: Optional[Callable[["GenerationWatch", dict], None]] = None):
        self.on_token = on_token
        self.tokens = 0
        self.totals = {k: 0 for k in _SUMMED}
        self.end: Optional[dict] = None   # on_generation_end's stats of the last generation
        self.started = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None

    def _token(self, stats: dict):
        now = time.perf_counter()
        self.tokens += 1
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        for k in _SUMMED:
            self.totals[k] += stats.get(k, 0)
        if self.on_token is not None:
            self.on_token(self, stats)

    @property
    def tokens_per_second(self) -> float:
        """Decode rate: tokens after the first over the time since the first."""
        if self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max(self.last_token_at - self.first_token_at, 1e-9)

    @property
    def bytes_read_per_token(self) -> float:
        return self.totals["bytes_read"] / self.tokens if self.tokens else 0.0

    def hit_rates(self) -> dict:
        """Share of expert requests served by each tier (device = VRAM, or RAM on CPU runs)."""
        t = self.totals
        n = t["hits"] + t["misses"]
        if not n:
            return {}
        rates = {"device": t["device_hits"] / n, "disk": t["misses"] / n}
        if t["host_hits"]:
            rates["host"] = t["host_hits"] / n
        return rates


class _Recorder:
    def __init__(self):
        self.local = threading.local()

    def _watches(self):
        return getattr(self.local, "watches", ())

    @hookimpl
    def on_token(self, stats):
        for w in self._watches():
            w._token(stats)

    @hookimpl
    def on_generation_end(self, stats):
        for w in self._watches():
            w.end = dict(stats)


_RECORDER = _Recorder()
_LOCK = threading.Lock()


def _ensure_registered():
    from flashmoe_plugin.plugins import manager
    pm = manager()
    with _LOCK:
        if not pm.is_registered(_RECORDER):
            pm.register(_RECORDER, "flashmoe_plugin.adapters.telemetry")


@contextmanager
def watch(on_token: Optional[Callable[[GenerationWatch, dict], None]] = None,
          into: Optional[GenerationWatch] = None) -> Iterator[GenerationWatch]:
    """Collect the engine's per-token and end-of-generation figures of this thread's generations
    (into `into` when given: a stream that different threads advance, as LangChain's async paths
    do, attaches its one watch around each step instead of across its yields)."""
    _ensure_registered()
    w = into if into is not None else GenerationWatch(on_token)
    local = _RECORDER.local
    local.watches = getattr(local, "watches", ()) + (w,)
    try:
        yield w
    finally:
        local.watches = tuple(x for x in local.watches if x is not w)


def watched(iterator, w: GenerationWatch):
    """Iterate `iterator` with `w` attached to whichever thread runs each step."""
    iterator = iter(iterator)
    while True:
        with watch(into=w):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item
