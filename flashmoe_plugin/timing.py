"""Wall-clock timing of a call, shared by the kernel bench and the runtime's cost models."""
from __future__ import annotations

import math
import time


def best_seconds(fn, reps: int = 3) -> float:
    """The fastest of `reps` timed calls of fn() after an untimed one (warm-up): one sample can be
    an outlier (a thread descheduled, a first touch)."""
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
