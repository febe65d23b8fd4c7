"""Where a CPU layer's time goes in n_cpu_moe decode, segmented (a graph per segment and Python
between two CPU layers: runtime/hybrid_decode.py) against fused (the token as one graph and one
host call: runtime/hybrid_token.py), in one process on one engine (p12, issue 10).

    python3 benchmarks/hybrid_breakdown.py STORE OUT.json [--n-cpu-moe 24] [--tokens 16] [--rounds 2]

The engine is built as `flashmoe bench --device cuda --n-cpu-moe N` builds it; a 64-token prompt,
then rounds of `tokens` greedy decode tokens, segmented then fused in turn (the tuner pinned to
every expert on the CPU: both paths run the same experts on the same C kernels). Segmented tokens
are instrumented with perf_counter stamps (the wrappers' own cost is in the figures, ~1 us each)
and CUDA events around each segment's replay; per CPU layer (medians over the layers and tokens):
  launch   the segment graph's replay() call on the host
  pre      replay() returned -> the wait for the packed row begins (the row's copy queued)
  wait     the wait for the packed row (the GPU's segment + the copy down)
  py_in    the row read (tolist) -> the C call starts (plan, records, zero_)
  c_call   the C kernels (module.moe)
  py_out   the C call returned -> decode returns (the copy up, the add, the bookkeeping)
  gap      decode returned -> the next replay()
  seg_gpu  the segment on the GPU (CUDA events before and after replay)
  layer    one CPU layer all in (C call start to the next C call start)
Fused tokens: per CPU layer, the host call's own clock from one row seen to the next (the C call,
the hand-back, the next segment on the GPU and its hand-off), and ms per token for both paths.
Also the C kernels alone on a token's two experts (pairs no earlier call read), as h11 measured."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from flashmoe_plugin.runtime.engine import Engine


class Stamps:
    def __init__(self):
        self.t: list = []

    def __call__(self, label):
        self.t.append((label, time.perf_counter()))


def wrap(obj, name, before, after):
    orig = getattr(obj, name)

    def f(*a, **k):
        before()
        r = orig(*a, **k)
        after()
        return r
    setattr(obj, name, f)
    return orig


class ModuleProxy:
    def __init__(self, mod, st):
        self._mod, self._st = mod, st

    def moe(self, *a, **k):
        self._st("c0")
        r = self._mod.moe(*a, **k)
        self._st("c1")
        return r

    def __getattr__(self, name):
        return getattr(self._mod, name)


def med(xs):
    return round(statistics.median(xs) * 1e3, 4) if xs else None


def main(argv):
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("out")
    ap.add_argument("--n-cpu-moe", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run on the CPU twin (no events)")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if not cuda:
        from flashmoe_plugin.runtime import hybrid_token
        hybrid_token.TWIN = True
    doc = {"load_avg_before": os.getloadavg(), "n_cpu_moe": a.n_cpu_moe}
    t0 = time.time()
    eng = Engine(a.store, device=a.device, decode_graph="on", n_cpu_moe=a.n_cpu_moe, io_threads=8, n_ctx=64 + 2 * a.rounds * a.tokens + 8)
    doc["load_s"] = round(time.time() - t0, 1)
    fast, cl, k = eng.fast, eng.cpu_layers, eng.config.top_k
    doc["fused_why"] = fast.fused_why
    fused = fast.fused
    # the tuner pinned to every expert on the CPU (both paths run the same work)
    if cl.tuners is not None:
        tuner = cl.tuner_of(k)
        tuner.descending, tuner.best, tuner.c, tuner.recheck = False, k, k, 0
    st = Stamps()
    cl.backend._k = ModuleProxy(cl.backend._k, st)
    wrap(cl, "decode", lambda: st("d0"), lambda: st("d1"))
    evs = []
    if cuda:
        wrap(fast.packed, "synchronize", lambda: st("w0"), lambda: st("w1"))

        def ev():
            e = torch.cuda.Event(enable_timing=True)
            e.record(fast.stream)
            evs.append(e)
        for g in fast.graphs:
            wrap(g, "replay", lambda: (st("r0"), ev()), lambda: (ev(), st("r1")))
    else:  # the twin: no graphs, no wait; the segments run in Python
        wrap(fast, "_segment", lambda: st("r0"), lambda: (st("r1"), st("w0"), st("w1")))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, eng.config.vocab_size - 1, (64,), generator=g).tolist()
    logits = eng.forward(ids)[-1]
    tok = int(logits.argmax())
    res = {"segmented": {"ms_per_token": []}, "fused": {"ms_per_token": [], "layer_ms": []}}
    spans = {n: [] for n in ("launch", "pre", "wait", "py_in", "c_call", "py_out", "gap", "seg_gpu", "layer")}
    for r in range(a.rounds):
        for mode in ("segmented", "fused"):
            fast.fused = fused if mode == "fused" else None
            for i in range(a.tokens):
                st.t.clear()
                evs.clear()
                t1 = time.perf_counter()
                logits = eng.forward([tok])
                res[mode]["ms_per_token"].append(time.perf_counter() - t1)
                tok = int(logits[-1].argmax())
                if mode == "fused" and fused is not None:
                    t = fused.t_ready.tolist()
                    res[mode]["layer_ms"] += [(b - x) / 1e9 for x, b in zip(t, t[1:])]
                if mode == "segmented" and st.t:
                    if cuda:
                        torch.cuda.synchronize()
                    _spans(st.t, evs, spans)
    fast.fused = fused
    doc["segmented_per_cpu_layer_ms"] = {n: med(v) for n, v in spans.items()}
    doc["segmented_ms_per_token"] = med(res["segmented"]["ms_per_token"])
    doc["fused_ms_per_token"] = med(res["fused"]["ms_per_token"])
    doc["fused_per_cpu_layer_ms"] = med(res["fused"]["layer_ms"])
    doc["fused_per_cpu_layer_p90_ms"] = round(sorted(res["fused"]["layer_ms"])[int(0.9 * len(res["fused"]["layer_ms"]))] * 1e3, 4) \
        if res["fused"]["layer_ms"] else None
    doc["tokens"] = {m: [round(x * 1e3, 3) for x in v["ms_per_token"]] for m, v in res.items()}
    doc["fused_tokens"] = 0 if fused is None else fused.tokens
    # the C kernels alone on a token's two experts (pairs no earlier call read)
    lay = cl.cut[cl.layers[0]][1]
    spec = cl.backend.spec(lay)
    x = torch.randn(1, lay.hidden)
    out = torch.zeros(1, lay.hidden)
    keys = [(l, e) for l in cl.layers for e in range(cl.experts[l])]
    times = []
    for i in range(0, min(len(keys), 48) - 1, 2):
        recs = [cl.records[keys[i]][:lay.size], cl.records[keys[i + 1]][:lay.size]]
        t1 = time.perf_counter()
        cl.backend._k._mod.moe(x, recs, [0.5, 0.5], spec, out)
        times.append(time.perf_counter() - t1)
    doc["c_kernels_alone_two_experts_ms"] = {"median": med(times), "best": round(min(times) * 1e3, 4)}
    doc["load_avg_after"] = os.getloadavg()
    eng.close()
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "tokens"}))


def _spans(stamps, evs, spans):
    """Per CPU layer spans from one segmented token's stamps (see the module docstring)."""
    seq = stamps
    # index each replay's stamps: r0 r1 [w0 w1 d0 c0 c1 d1] per CPU layer, the last segment r0 r1
    rs = [i for i, (lab, _) in enumerate(seq) if lab == "r0"]
    c0s = [t for lab, t in seq if lab == "c0"]
    for j, i in enumerate(rs[:-1]):
        block = dict()
        for lab, t in seq[i:rs[j + 1] + 1]:
            block.setdefault(lab, t)  # first occurrence in the block
        nxt = seq[rs[j + 1]][1]
        need = ("r0", "r1", "w0", "w1", "d0", "c0", "c1", "d1")
        if not all(n in block for n in need):
            continue
        spans["launch"].append(block["r1"] - block["r0"])
        spans["pre"].append(block["w0"] - block["r1"])
        spans["wait"].append(block["w1"] - block["w0"])
        spans["py_in"].append(block["c0"] - block["w1"])
        spans["c_call"].append(block["c1"] - block["c0"])
        spans["py_out"].append(block["d1"] - block["c1"])
        spans["gap"].append(nxt - block["d1"])
    for a, b in zip(c0s, c0s[1:]):
        spans["layer"].append(b - a)
    for j in range(0, len(evs) - 2, 2):  # the last segment (the other layers, the head) left out
        spans["seg_gpu"].append(evs[j].elapsed_time(evs[j + 1]) / 1e3)


if __name__ == "__main__":
    main(sys.argv[1:])
