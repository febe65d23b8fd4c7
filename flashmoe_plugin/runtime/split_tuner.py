"""The decode split of a CPU layer (runtime/cpu_layers.py) chosen by decode's own measured time.

CpuLayers gives the CPU the first c of a token's k*q expert slices and the copy engine + GPU the
rest. Start-up costs chose c wrongly on the H200's 32-layer rows (the 12-layer store's figures did
not carry over): the CPU and the copy engine read the same RAM, and the host's launches and waits
sit on one side or the other. So c is chosen by what decode measures: the wall time of a CPU layer,
from its decode call to the next CPU layer's, which holds all of it (both sides, their contention
for RAM, the launches, the next layer's attention on the GPU).

The tuner starts with every slice on the CPU (after a first token's calls, dropped) and moves one slice at a time to the GPU while that
measures faster, stops once two steps in a row did not beat the best (one, when that step was
clearly slower: whole Mixtral experts, 2 on the CPU 1.8 ms, 1 2.1 ms, 0 3.7 ms), keeps the best,
and every `recheck` calls measures the best's two neighbours again (the load and the routing
drift; a neighbour that now measures faster by MARGIN is taken). A share's time is the lower
quartile of its latest `samples` calls, not their median: what disturbs a CPU layer only adds
time (another process's thread on a core the C kernels' barrier waits for), and came in bursts of
several calls (h11's H200 calls: medians of 2.5 and 8 ms at the share whose other samples took
1.8, and the tuner left it for a slower one). On the H200's Mixtral rows the descent takes one or
two tokens.
"""
from __future__ import annotations

from statistics import median

MARGIN = 0.03  # a recheck moves the best only to a neighbour this much faster (noise is not a move)
CLEAR = 0.10   # a descent step this much slower than the best ends the descent at once


class SplitTuner:
    def __init__(self, top: int, samples: int = 5, recheck: int = 240, warmup: int = 0):
        if top < 1 or samples < 1:
            raise ValueError(f"SplitTuner: top {top} and samples {samples} must be at least 1")
        self.top, self.samples, self.recheck = top, samples, recheck
        # samples dropped at the start: an engine's first decode token ran 12-25% slower than the
        # next ones on the H200 whatever the share (h200-h10d-sweep.json), and the descent's first
        # shares would carry it
        self.warmup = warmup
        self.times: dict[int, list[float]] = {}  # c -> its latest samples (seconds per CPU layer)
        self.best = self.c = top  # the best measured share; the share in use
        self._fresh = 0  # samples of c taken since it was chosen for measuring
        self._queue: list[int] = []  # neighbours to measure at a recheck
        self._since = 0  # calls with the best since the last recheck
        self._misses = 0  # descent steps in a row that did not beat the best
        self.descending = True
        self.moves = 0  # how often a recheck moved the best (for bench)

    def median_of(self, c: int) -> float | None:
        t = self.times.get(c)
        return median(t) if t else None

    def time_of(self, c: int) -> float | None:
        """Share c's time: the lower quartile of its latest samples (disturbances only add time)."""
        t = self.times.get(c)
        return sorted(t)[(len(t) - 1) // 4] if t else None

    def record(self, c: int, seconds: float) -> None:
        """One CPU layer's wall time with share c (the share in use when that layer ran)."""
        if self.warmup > 0:
            self.warmup -= 1
            return
        t = self.times.setdefault(c, [])
        t.append(seconds)
        del t[:-self.samples]
        if c != self.c:  # a late sample of a share no longer in use: kept, it decides nothing
            return
        self._fresh += 1
        if self.descending:
            if self._fresh >= self.samples:
                self._descend()
        elif self.c != self.best:  # a neighbour measured afresh
            if self._fresh >= self.samples:
                self._next_neighbour()
        else:
            self._since += 1
            if self.recheck and self._since >= self.recheck:
                self._since = 0
                self._queue = [n for n in (self.best - 1, self.best + 1) if 0 <= n <= self.top]
                self._next_neighbour(start=True)

    def _use(self, c: int) -> None:
        self.c, self._fresh = c, 0

    def _descend(self):
        m, b = self.time_of(self.c), self.time_of(self.best)
        if self.c != self.best and m < b:
            self.best, self._misses = self.c, 0
        elif self.c != self.best:
            self._misses += 2 if m > (1 + CLEAR) * b else 1
        if self._misses >= 2 or self.c == 0:
            self.descending = False
            self._use(self.best)
        else:
            self._use(self.c - 1)

    def _next_neighbour(self, start: bool = False):
        if not start:  # self.c was just measured afresh: it becomes the best if it beats it
            if self.time_of(self.c) < (1 - MARGIN) * self.time_of(self.best):
                self.best = self.c
                self.moves += 1
        if self._queue:
            self._use(self._queue.pop(0))
            self.times.pop(self.c, None)  # measured afresh
        else:
            self._use(self.best)

    def report(self) -> dict:
        """For bench: the share in use, the best, and the measured times (ms per CPU layer: the lower
        quartile the tuner decides by, and the median)."""
        return {"best": self.best, "descending": self.descending, "moves": self.moves,
                "ms_by_share": {c: round(self.time_of(c) * 1e3, 4) for c, t in sorted(self.times.items()) if t},
                "median_ms_by_share": {c: round(median(t) * 1e3, 4) for c, t in sorted(self.times.items()) if t}}
