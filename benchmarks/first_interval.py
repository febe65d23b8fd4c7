"""Where the pipelined decode's first interval goes (issue 9: 37-40 ms on the H200 where later
tokens take ~3.1 ms). Prefill, then the pipelined loop with every part of a step timed on the host
(queue, the replay call, the wait for the step, the settle's bookkeeping) and Python's garbage
collections recorded; three rounds in one process: as bench runs it, again, and with gc.collect()
before the decode. JSON on stdout.

    python benchmarks/first_interval.py STORE [--dense-quant q4] [--tokens 8]
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from flashmoe_plugin.bench.store import prompt_ids
from flashmoe_plugin.pager.trace import RoutingTrace
from flashmoe_plugin.runtime import pipelined
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams

EVENTS: list = []


def timed(obj, name: str, label: str):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((label, t, time.perf_counter()))
    setattr(obj, name, wrapper)


class Replay:
    """f.graph with its replay call timed (the object torch gives cannot take attributes)."""

    def __init__(self, g):
        self.g = g

    def replay(self):
        t = time.perf_counter()
        self.g.replay()
        EVENTS.append(("graph.replay", t, time.perf_counter()))


def on_gc(phase, info):
    if phase == "start":
        on_gc.t = time.perf_counter()
    else:
        EVENTS.append((f"gc gen{info['generation']}", on_gc.t, time.perf_counter()))


def rounds(eng, ids, n: int, collect: bool) -> dict:
    eng.reset()
    logits = eng.forward(ids, last_only=True)[-1]
    if collect:
        gc.collect()
    sample = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    pipe = pipelined.Pipeline.of(eng)
    EVENTS.clear()
    marks, gen = [], pipe.tokens(logits, sample)
    for i, _ in enumerate(gen):
        marks.append(time.perf_counter())
        if i == n:
            break
    gen.close()
    t0 = marks[0]
    return {"gc_collected_first": collect,
            "token_ms": [round((b - a) * 1e3, 3) for a, b in zip(marks, marks[1:])],
            "events_in_first_interval": [(lab, round((a - t0) * 1e3, 3), round((b - a) * 1e3, 3))
                                         for lab, a, b in EVENTS if marks[0] <= a < marks[1]],
            "events_before_first_token": [(lab, round((a - t0) * 1e3, 3), round((b - a) * 1e3, 3))
                                          for lab, a, b in EVENTS if a < marks[0]],
            "gc_ms_by_interval": [round(sum((b - a) * 1e3 for lab, a, b in EVENTS if lab.startswith("gc") and x <= a < y), 3)
                                  for x, y in zip(marks, marks[1:])]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--dense-quant", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    eng = Engine(a.store, device="cuda" if torch.cuda.is_available() else "cpu",
                 n_ctx=a.prompt_tokens + a.tokens + 8, dense_quant=a.dense_quant,
                 decode_graph="auto" if torch.cuda.is_available() else "on")  # CPU: the uncaptured twin
    eng.record(RoutingTrace())
    ids = prompt_ids(eng.tokenizer, a.prompt_tokens, eng.config.vocab_size)
    f = eng.fast
    if f is not None and f.graph is not None:
        f.graph = Replay(f.graph)
    for cls, names in ((pipelined.Pipeline, ("_queue", "_settle", "_drain")), (pipelined.DeviceSampler, ("pick",))):
        for nm in names:
            timed(cls, nm, f"{cls.__name__}.{nm}")
    timed(eng.pager, "touch_noted", "pager.touch_noted")
    if f is not None:
        timed(f, "_note", "decode._note")
        timed(f.table, "ready", "table.ready")
    if f is not None and f.cuda:
        orig = torch.cuda.Event.synchronize

        def sync(ev):
            t = time.perf_counter()
            orig(ev)
            EVENTS.append(("event.synchronize", t, time.perf_counter()))
        torch.cuda.Event.synchronize = sync
    gc.callbacks.append(on_gc)
    why = pipelined.why_not(eng, Sampler(SamplingParams(temperature=1.0)))
    out = {"pipelined": why or "on", "gc_threshold": gc.get_threshold(), "gc_count_after_load": gc.get_count(),
           "rounds": [rounds(eng, ids, a.tokens, c) for c in (False, False, True)]}
    print(json.dumps(out))
    eng.close()


if __name__ == "__main__":
    main()
