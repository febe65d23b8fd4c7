"""Warm prefill: the same prompt again on an engine whose experts are resident where they fit
(llama-bench's repetitions), timed a few times and reported as the median.

One warm prompt is a noisy figure (the first one after the decode runs ~3.5% slower on the H200),
and they come before anything runs torch.profiler in the process: Kineto leaves CUPTI attached
after a profile ends (pytorch/pytorch#144455), which slows every later launch. Measured on the
H200 (benchmarks/results/h200-p9b-prefill-32l.json): 7% on a host-bound prefill (an expert at a
time: 5942 -> 5535 tok/s), 1% where the GPU is the bound (the grouped kernel: 4168 -> 4114).
"""
from __future__ import annotations

import statistics
import time

import torch

REPS = 5
BUDGET_S = 10.0
METHOD = (f"median of up to {REPS} warm prompts (the same prompt after eng.reset(), experts resident where they "
          f"fit), stopping once they have taken {BUDGET_S:.0f} s (at least one), timed before any profiling in the "
          "process; llama-bench reports the mean of its -r repetitions (5 by default; rival.py passes -r 2)")


def warm_prefills(engine, ids: list[int], reps: int = REPS, budget_s: float = BUDGET_S) -> list[float]:
    """tok/s of each warm prompt (each after engine.reset(), the device idle at its start)."""
    cuda = engine.device.type == "cuda"
    out, spent = [], 0.0
    while len(out) < reps and (not out or spent < budget_s):
        engine.reset()
        if cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        engine.forward(ids, last_only=True)  # returns the logits on the host: the device is done
        dt = time.perf_counter() - t0
        spent += dt
        out.append(len(ids) / dt)
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
