"""Issue 10's hybrid rows in one process (torch.compile and the CUDA context paid once): `flashmoe
bench` (run_bench) on one store for several --n-cpu-moe values (plain N: the default, sliced experts and
the share by measured time, runtime/split_tuner.py), and A/B variants of CpuLayers.plan (the tuner off):
",cpu" every CPU-layer expert of a decode token on the CPU, ",split" one of them copied up (session 6's plan), ",slice" experts cut into slices of their
intermediate rows (FLASHMOE_SLICE_EXPERTS=1, store/slices.py), ",wantN" the same with slices cut so
that a token has at least N (slice_count's `want`, default 16), ",whole" sliced records but the
share cut at whole experts only, ",spinN" the C pool's idle threads spinning N us (CpuLayers.spin_us)
instead of its default, ",old" session 6's decode host path (OLD_DECODE below: copies on
the copy stream through events, views and events made per call, the sum added in two kernels).

    python3 benchmarks/h200_hybrid_rows.py STORE OUT.json N[,cpu|,split|,slice|,wantN|,whole|,spinN|,old] ...   e.g.  /tmp/m12 r.json 9 9,old 9,slice

Each row also carries "probe": host wall time per CPU layer of the decode steps, means in ms from
perf_counter wrappers (about a microsecond each): HybridDecode._host_layer whole; inside it the wait
for the packed row and CpuLayers.decode; inside that the C kernels' call, the GPU share's queueing
(CpuLayers._gpu_share: its copies and its kernel's launch, CudaBackend.moe_decode, timed apart),
the rest of decode being the CPU sum's way to the device and Python; and per graph replay.

DEVICE=cpu tries it on the CPU twin. Prints one line per row; writes {row: run_bench's dict} to OUT.json after every row."""
from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

from flashmoe_plugin.bench.store import run_bench
from flashmoe_plugin.runtime import cpu_layers as host_compute  # slice_count as CpuLayers sees it
from flashmoe_plugin.runtime.cpu_layers import CpuLayers


class Probe:
    """perf_counter sums around a few calls, each counted only inside its caller's (nesting by `inside`)."""

    def __init__(self):
        self.t, self.n, self.inside, self.undo = defaultdict(float), defaultdict(int), None, []

    def wrap(self, owner, name, key, only_in=None):
        f = getattr(owner, name)

        def timed(*a, **kw):
            if only_in is not None and self.inside != only_in:
                return f(*a, **kw)
            prev, self.inside = self.inside, key
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0
                self.n[key] += 1
                self.inside = prev
        setattr(owner, name, timed)
        self.undo.append((owner, name, f))

    def result(self) -> dict:
        for owner, name, f in reversed(self.undo):
            setattr(owner, name, f)
        return {k: {"calls": self.n[k], "mean_ms": round(self.t[k] / max(1, self.n[k]) * 1e3, 4)} for k in self.t}


def probed():
    import torch
    from flashmoe_plugin import _cpu_kernels
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.pager.tiers import CudaCopies
    from flashmoe_plugin.runtime.hybrid_decode import HybridDecode
    p = Probe()
    p.wrap(HybridDecode, "_host_layer", "host_layer")
    p.wrap(torch.cuda.Event, "synchronize", "wait_packed", only_in="host_layer")
    p.wrap(CpuLayers, "decode", "decode", only_in="host_layer")
    p.wrap(_cpu_kernels, "moe", "cpu_kernels", only_in="decode")
    p.wrap(CpuLayers, "_gpu_share", "gpu_share", only_in="decode")
    p.wrap(CudaCopies, "copy", "copy_issue", only_in="decode")  # OLD_DECODE's
    p.wrap(CudaBackend, "moe_decode", "gpu_launch", only_in="gpu_share")
    p.wrap(CudaBackend, "moe_decode", "gpu_launch_old", only_in="decode")  # OLD_DECODE's
    p.wrap(torch.cuda.CUDAGraph, "replay", "replay")
    return p


def OLD_DECODE(self, layer, xh, chosen, weights, x, out=None):
    """CpuLayers.decode as of session 6 (commit 14bf88c), for the A/B: the copies on the copy stream
    (CudaCopies.copy, events per slot), views and events made per call, the sum added in two kernels."""
    import torch
    q, lay = self.cut[layer]
    k = len(chosen)
    n, m = divmod(self.plan(k, q), q)
    up_ = [(chosen[i], m if i == n else 0, weights[i]) for i in range(n, k)]
    if self._ahead:
        self._keep_ahead(layer, [e for e, _, _ in up_])
    gpu_out = None
    if up_:
        if self._decoded:  # this module's decode ran before in the process: fence its slots
            fence = self.copies.fence()
            self._fence = [fence] * len(self._fence)
            self._decoded = False
        ups = [self._up(layer, e, lo) for e, lo, _ in up_]
        for _, ev in ups:
            self.copies.use(ev)
        recs, ws = [], []
        for (s, _), (e, lo, w) in zip(ups, up_):
            recs += self._pieces(self.slots[s], layer, lo, q)
            ws += [w] * (q - lo)
        gpu_out = self.gpu.moe_decode(x, recs, torch.tensor(ws), lay)
        for s, _ in ups:
            self._used(s)
        self.split_up += len(ups)
    if n == 0 and m == 0:
        return gpu_out if out is None else out.copy_(gpu_out)
    host = self._host_out
    recs, ws = [], []
    for i in range(n + bool(m)):
        hi = q if i < n else m
        recs += self._pieces(self.records[(layer, chosen[i])], layer, 0, hi)
        ws += [float(weights[i])] * hi
    t0 = time.perf_counter()
    host.zero_()
    self.backend.module.moe(xh, tuple(recs), ws, self.backend.spec(lay), host)
    if self._adapt:
        self.cpu_s = 0.9 * self.cpu_s + 0.1 * (time.perf_counter() - t0) * q / len(recs)
    if out is None:
        out = torch.empty_like(x)
    out.copy_(self._dev_out.copy_(host, non_blocking=True))
    return out if gpu_out is None else out.add_(gpu_out)


def main(store: str, out: str, rows: list[str]):
    plan, count, env = CpuLayers.plan, host_compute.slice_count, os.environ.get("FLASHMOE_SLICE_EXPERTS")
    decode, spin = CpuLayers.decode, CpuLayers.spin_us
    doc = {}
    for row in rows:
        n, _, mode = row.partition(",")
        if mode == "cpu":
            CpuLayers.plan = lambda self, k, q=1: k * q
        if mode == "split":  # one expert up, the others here
            CpuLayers.plan = lambda self, k, q=1: (k - 1) * q
        if mode == "whole":
            CpuLayers.plan = lambda self, k, q=1: q * plan(self, k, 1)
        if mode == "old":  # session 6's host path and the pool's default spin
            CpuLayers.decode, CpuLayers.spin_us = OLD_DECODE, 50
        if mode.startswith("spin"):
            CpuLayers.spin_us = int(mode[4:])
        os.environ["FLASHMOE_SLICE_EXPERTS"] = "1" if mode in ("", "slice", "whole") or mode.startswith("want") else "0"
        CpuLayers.tune = mode == ""  # the default: the share by measured time (SplitTuner); the variants by plan
        if mode.startswith("want"):
            host_compute.slice_count = lambda layout, k, want=None, n=int(mode[4:]): count(layout, k, n)
        t0 = time.time()
        probe = probed()
        try:
            r = run_bench(store, device=os.environ.get("DEVICE", "cuda"), tokens=32, prompt_tokens=512, io_threads=8, compute_bound=False,
                          n_cpu_moe=int(n))
        except Exception as e:  # noqa: BLE001 - report and go on with the next row
            print(row, "FAILED", type(e).__name__, e, flush=True)
            doc[row] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            r_probe = probe.result()  # first: it restores what it wrapped (a variant's decode among them)
            CpuLayers.plan, CpuLayers.decode, host_compute.slice_count, CpuLayers.spin_us = plan, decode, count, spin
            CpuLayers.tune = True
            os.environ.pop("FLASHMOE_SLICE_EXPERTS") if env is None else os.environ.update(FLASHMOE_SLICE_EXPERTS=env)
        r["probe"] = r_probe
        doc[row] = r
        print(f"n_cpu_moe {row}: decode {r['decode_tok_s']:.2f} tok/s, prefill cold {r['prefill_tok_s']:.0f} warm "
              f"{r['prefill_warm_tok_s']:.0f}, host {r.get('host_ms_per_token')} ms/token, graph {r['decode_graph']} "
              f"fallbacks {r['decode_graph_fallbacks']}, split {r.get('n_cpu_moe_split')} probe {r_probe} ({time.time() - t0:.0f} s)",
              flush=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
