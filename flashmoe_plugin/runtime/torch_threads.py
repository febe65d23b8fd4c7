"""torch's own threads while a CPU engine with the native kernels runs a decode step: one.

The native kernels (kernels/cpu_backend.py) keep their pool of torch.get_num_threads() threads for
the expert and dense matrices; what torch computes itself in a step (norms, RoPE, attention,
routing) is small, and a second OpenMP thread there costs more in wake-ups and
in turns with the native pool than it saves. Measured on the 2-core box (quiet lock, a 2-layer
Mixtral-shaped store, dense q8): decode 39.4-40.0 ms per token with torch on 2 threads, 24.8-25.6
with torch on 1 (the native pool on 2 both times); prefill of 16 / 128 tokens 0.276 / 1.95 s
against 0.25 / 1.84 s; an 8-layer view of the rival store (every expert resident, dense q8,
alternating in one process): 129.6-135.4 ms per token against 89.1-97.3. Prefill keeps torch's
threads (its attention grows with the chunk and the context; unmeasured at long contexts). The
caller's thread count is restored after the step (torch's count is process-wide: two engines
stepping in two threads at once may leave each other's steps on one thread)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def torch_on_one_thread(active: bool = True):
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
