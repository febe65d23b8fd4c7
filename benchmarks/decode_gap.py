"""How long the GPU waits for the host between two decode tokens (issue 9): every expert resident,
the same engine timed two ways, one JSON line on stdout.

- wall_ms: a greedy decode loop through Engine.forward (as `flashmoe bench` decodes: the logits
  read back, the next token picked on the host, the next step replayed);
- graph_ms: the captured step replayed back to back with no host work between replays (CUDA
  events around N replays): the GPU's own time per token, gaps between its kernels included;
- gap_ms = wall_ms - graph_ms: what the host adds per token (the sync, settle's bookkeeping, the
  read-back, the sampling, the next input's upload, Python).

    python3 benchmarks/decode_gap.py STORE [--dense-quant q4] [--tokens 64] [--trace] [--probe]

--trace: the loop again with a RoutingTrace attached, as `flashmoe bench` decodes (wall_trace_ms;
the probe then runs with it too). --probe adds where the host's time goes
in the loop (means in us per token, perf_counter stamps): "pre" from Engine.forward's entry to the
replay call, "launch" the replay call, "wait" from its return to the read-back's wait's end (the
GPU's time, with the host's hidden work), "post" from there to forward's return, "outside" the
loop's own argmax; and from CUDA events around each replay, "gpu_graph" the replay's device time
and "gpu_idle" the device's idle time between two replays.

Works on any tree whose Engine has the graph-captured decode (engine.fast.graph), so one call can
measure two trees on the same store."""
from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--dense-quant", default="q4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--label", default="")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--probe", action="store_true")
    a = ap.parse_args()
    from flashmoe_plugin.runtime.engine import Engine
    from flashmoe_plugin.store.model import open_model
    st = open_model(a.store)
    n_ctx = a.prompt + 12 * a.tokens + 64  # the loops' tokens and the replays' positions
    eng = Engine(a.store, device="cuda", n_ctx=n_ctx, vram_budget=st.expert_bytes, ram_budget=0, prefetch="off",
                 dense_quant=a.dense_quant)
    for layer, info in st.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, eng.config.vocab_size, (a.prompt,), generator=g).tolist()
    logits = eng.forward(ids, last_only=True)[-1]
    out = {"label": a.label, "captured": eng.fast is not None and eng.fast.graph is not None, "trace": a.trace}

    def loop(n, logits):
        for _ in range(n):
            logits = eng.forward([int(logits.argmax())], last_only=True)[-1]
        return logits
    logits = loop(8, logits)  # warm

    def walls(logits):
        ws = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = loop(a.tokens, logits)
            ws.append((time.perf_counter() - t0) / a.tokens * 1e3)
        return min(ws), [round(w, 4) for w in ws], logits
    out["wall_ms"], out["wall_ms_all"], logits = walls(logits)
    if a.trace:  # then the same with a trace attached, as `flashmoe bench` decodes
        from flashmoe_plugin.pager.trace import RoutingTrace
        eng.record(RoutingTrace())
        out["wall_trace_ms"], out["wall_trace_ms_all"], logits = walls(logits)
    f = eng.fast
    if out["captured"]:
        with torch.cuda.stream(f.stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graphs = []
            for _ in range(3):
                f.graph.replay()
                start.record()
                for _ in range(a.tokens):
                    f.graph.replay()
                end.record()
                end.synchronize()
                graphs.append(start.elapsed_time(end) / a.tokens)
        out["graph_ms"], out["graph_ms_all"] = min(graphs), [round(x, 4) for x in graphs]
        out["gap_ms"] = out["wall_ms"] - out["graph_ms"]
        out["tok_s"], out["graph_bound_tok_s"] = 1e3 / out["wall_ms"], 1e3 / out["graph_ms"]
    if a.probe and out["captured"]:
        out["probe"] = probe(eng, a.tokens, logits)
    out["misses"] = eng.pager.stats.misses
    eng.close()
    print(json.dumps(out))


class _Timed:
    """The captured graph with its replay call stamped and bracketed by CUDA events."""

    def __init__(self, graph, stamps):
        self.g, self.stamps = graph, stamps

    def __getattr__(self, name):
        return getattr(self.g, name)

    def replay(self):
        s = self.stamps
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        s["b"] = time.perf_counter()
        self.g.replay()
        s["c"] = time.perf_counter()
        e1.record()
        s["events"].append((e0, e1))


def probe(eng, n: int, logits) -> dict:
    f, stamps, rows = eng.fast, {"events": []}, []
    graph, read_back, forward = f.graph, f._read_back, eng.forward
    f.graph = _Timed(graph, stamps)

    def timed_read_back():
        read_back()
        stamps["d"] = time.perf_counter()

    def timed_forward(*args, **kw):
        stamps["a"] = time.perf_counter()
        r = forward(*args, **kw)
        stamps["e"] = time.perf_counter()
        return r
    f._read_back, eng.forward = timed_read_back, timed_forward
    try:
        last = None
        for _ in range(n):
            tok = int(logits.argmax())
            logits = eng.forward([tok], last_only=True)[-1]
            a, b, c, d, e = (stamps[k] for k in "abcde")
            rows.append({"outside": a - last if last else None, "pre": b - a, "launch": c - b, "wait": d - c, "post": e - d})
            last = e
        torch.cuda.synchronize()
    finally:
        f.graph, f._read_back, eng.forward = graph, read_back, forward
    ev = stamps["events"][-n:]
    out = {k: sum(r[k] for r in rows if r[k] is not None) / sum(1 for r in rows if r[k] is not None) * 1e6
           for k in ("outside", "pre", "launch", "wait", "post")}
    out["gpu_graph"] = sum(s.elapsed_time(t) for s, t in ev) / len(ev) * 1e3
    out["gpu_idle"] = sum(ev[i - 1][1].elapsed_time(ev[i][0]) for i in range(1, len(ev))) / (len(ev) - 1) * 1e3
    return {k: round(v, 1) for k, v in out.items()}


if __name__ == "__main__":
    main()
