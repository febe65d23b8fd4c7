"""The host between two decode tokens, with and without the pipelined loop (issue 9, s12): one
JSON line per engine on stdout.

    python3 benchmarks/pipelined_ab.py STORE [--dense-quant q4 auto] [--tokens 32] [--rounds 2]

Per --dense-quant value, one engine as `flashmoe bench` builds it (device cuda, default budgets:
every expert in VRAM; n_ctx = prompt + tokens + 8; a RoutingTrace attached), a 512-token prompt,
then rounds from the same position (Engine.truncate), alternating:
- loop: `flashmoe bench`'s own _decode with FLASHMOE_PIPELINE=0 (main's loop): `bench_ms` is
  what bench reports (the forward() calls alone), `wall_ms` the loop with the host's sampling;
- pipe: the same _decode pipelined (runtime/pipelined.py): wall time, everything included;
each at temperature 1.0 (bench's default: the full distribution, seeded) and greedy. Then
`graph_ms`: the captured step replayed back to back (the GPU's own time per token); and per loop
(greedy) `probe`: CUDA events around every replay, `gpu_idle_us` = the device's idle time between
two replays (in the pipelined loop the sampler's few kernels and copies run there), and the host's
parts in us per token (unpipelined: decode_gap.py's probe; pipelined: time in the queue half,
time in the settle half less its wait).
DEVICE=cpu runs the same on the CPU twin (decode_graph on; a dry run of the script: no events,
no graph)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--dense-quant", nargs="+", default=["q4", "auto"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    for dq in a.dense_quant:
        print(json.dumps(measure(a.store, dq, a.tokens, a.prompt, a.rounds)), flush=True)


def measure(store, dense_quant, n, prompt, rounds) -> dict:
    from flashmoe_plugin.bench.store import _decode
    from flashmoe_plugin.pager.trace import RoutingTrace
    from flashmoe_plugin.runtime import pipelined
    from flashmoe_plugin.runtime.engine import Engine
    dev = os.environ.get("DEVICE", "cuda")
    cuda = dev == "cuda"
    t0 = time.perf_counter()
    eng = Engine(store, device=dev, n_ctx=prompt + n + 8, dense_quant=dense_quant, io_threads=8,
                 decode_graph="auto" if cuda else "on")
    eng.record(RoutingTrace())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, eng.config.vocab_size, (prompt,), generator=g).tolist()
    logits = eng.forward(ids, last_only=True)[-1]
    out = {"dense_quant": eng.dense_quant, "captured": eng.fast is not None and eng.fast.graph is not None,
           "load_prefill_s": round(time.perf_counter() - t0, 1), "tokens": n, "prompt": prompt,
           "loadavg": open("/proc/loadavg").read().split()[:3]}

    def one(pipe: bool, temp: float):
        os.environ[pipelined.ENV] = "1" if pipe else "0"
        eng.truncate(prompt)
        sync()
        w0 = time.perf_counter()
        secs, _ = _decode(eng, logits, n, temp, 0)
        sync()
        return secs / n * 1e3, (time.perf_counter() - w0) / n * 1e3, list(eng.tokens[prompt:])

    def sync():
        if cuda:
            torch.cuda.synchronize()
    one(False, 1.0), one(True, 1.0), one(True, 0.0)  # warm: first launches, pinned buffers
    res: dict = {}
    for _ in range(rounds):
        for temp in (1.0, 0.0):
            for pipe in (False, True):
                bench_ms, wall_ms, toks = one(pipe, temp)
                r = res.setdefault(f"{'pipe' if pipe else 'loop'}_t{temp:g}", {"bench_ms": [], "wall_ms": []})
                r["bench_ms"].append(round(bench_ms, 4))
                r["wall_ms"].append(round(wall_ms, 4))
                r["tokens_head"] = toks[:8]
                r["tokens_all"] = toks
    for key, r in res.items():
        r["best_bench_ms"], r["best_wall_ms"] = min(r["bench_ms"]), min(r["wall_ms"])
        r["bench_tok_s"] = 1e3 / r["best_bench_ms"]
    for temp in ("1", "0"):
        same = res[f"loop_t{temp}"].pop("tokens_all") == res[f"pipe_t{temp}"].pop("tokens_all")
        out[f"same_tokens_t{temp}"] = same
    out["runs"] = res
    f = eng.fast
    if out["captured"]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = []
        eng.truncate(prompt)
        for _ in range(3):  # from the prompt's end each time: n + 1 positions, inside n_ctx
            f.pos.fill_(prompt)
            f.graph.replay()
            start.record()
            for _ in range(n):
                f.graph.replay()
            end.record()
            end.synchronize()
            best.append(start.elapsed_time(end) / n)
        out["graph_ms"], out["graph_ms_all"] = min(best), [round(x, 4) for x in best]
        out["graph_tok_s"] = 1e3 / out["graph_ms"]
        f.pos_value = -1  # the replays moved the position: the next step sets it
        out["probe_loop"] = probe_loop(eng, prompt, n)
        out["probe_pipe"] = probe_pipe(eng, prompt, n)
    out["fallbacks"], out["voided"] = f.fallbacks, pipelined.Pipeline.of(eng).voided
    out["misses"] = eng.pager.stats.misses
    eng.close()
    return out


class _Timed:
    """The graph with CUDA events around each replay."""

    def __init__(self, graph, events):
        self.g, self.events = graph, events

    def __getattr__(self, name):
        return getattr(self.g, name)

    def replay(self):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        self.g.replay()
        e1.record()
        self.events.append((e0, e1))


def _gpu(events) -> dict:
    torch.cuda.synchronize()
    ev = events[1:]
    return {"gpu_graph_us": round(sum(s.elapsed_time(t) for s, t in ev) / len(ev) * 1e3, 1),
            "gpu_idle_us": round(sum(ev[i - 1][1].elapsed_time(ev[i][0]) for i in range(1, len(ev)))
                                 / (len(ev) - 1) * 1e3, 1)}


def probe_loop(eng, prompt, n) -> dict:
    """Main's loop (greedy, Engine.forward): decode_gap.py's host stamps, then the GPU's idle."""
    import decode_gap
    from flashmoe_plugin.runtime import pipelined
    os.environ[pipelined.ENV] = "0"
    last = eng.tokens[prompt - 1]
    eng.truncate(prompt - 1)
    logits = eng.forward([last], last_only=True)[-1]
    host = decode_gap.probe(eng, n, logits)
    eng.truncate(prompt)
    f, events = eng.fast, []
    graph = f.graph
    f.graph = _Timed(graph, events)
    try:
        for _ in range(n):
            logits = eng.forward([int(logits.argmax())], last_only=True)[-1]
        return {**host, **_gpu(events)}
    finally:
        f.graph = graph


def probe_pipe(eng, prompt, n) -> dict:
    """The pipelined loop (greedy): the GPU's idle between replays; the host's queue half and its
    settle half less the wait, in us per token."""
    from flashmoe_plugin.runtime import pipelined
    from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams
    os.environ[pipelined.ENV] = "1"
    last = eng.tokens[prompt - 1]
    eng.truncate(prompt - 1)
    logits = eng.forward([last], last_only=True)[-1]
    f, events = eng.fast, []
    pipe = pipelined.Pipeline.of(eng)
    graph, f.graph = f.graph, _Timed(f.graph, events)
    spent = {"queue": 0.0, "settle": 0.0, "wait": 0.0}
    queue, settle, done = pipe._queue, pipe._settle, pipe.done

    class _Ev:
        def __init__(self, ev):
            self.ev = ev

        def record(self):
            self.ev.record()

        def synchronize(self):
            t = time.perf_counter()
            self.ev.synchronize()
            spent["wait"] += time.perf_counter() - t

    def timed(fn, key):
        def run(*args, **kw):
            t = time.perf_counter()
            r = fn(*args, **kw)
            spent[key] += time.perf_counter() - t
            return r
        return run
    pipe._queue, pipe._settle, pipe.done = timed(queue, "queue"), timed(settle, "settle"), [_Ev(e) for e in done]
    try:
        gen = pipe.tokens(logits, Sampler(SamplingParams(temperature=0)))
        t0 = time.perf_counter()
        for i, _ in enumerate(gen):
            if i == n:
                break
        wall = time.perf_counter() - t0
        gen.close()
        r = _gpu(events[:n])
    finally:
        f.graph, pipe._queue, pipe._settle, pipe.done = graph, queue, settle, done
    return {"queue_us": round(spent["queue"] / n * 1e6, 1),
            "settle_less_wait_us": round((spent["settle"] - spent["wait"]) / n * 1e6, 1),
            "wait_us": round(spent["wait"] / n * 1e6, 1), "wall_us": round(wall / n * 1e6, 1), **r}


if __name__ == "__main__":
    main()
