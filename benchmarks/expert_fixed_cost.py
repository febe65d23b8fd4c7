"""Where the expert kernel's fixed cost per decode layer goes (issue 9, e12): several builds of
fm_kernels.cu in ONE process, interleaved, over a sweep of layer sizes, distinct or L2-resident records.

    python benchmarks/expert_fixed_cost.py --builds main=DIR bar=DIR ... [--variants main: bar:stages=6 ...]
        [--cases mixtral,mixtral1,qwen35,...] [--json FILE]

--builds NAME=DIR: a directory holding a build's `_kernels_cuda*.so` ("tree": the installed one);
each is loaded as its own module (each .so keeps its own knobs and launch caches).
--variants BUILD[:KEY=VALUE,...]: a build with `tune` knobs (default: every build, no knobs); the key
"mode" picks fmc_moe's mode instead (1 cooperative, the default; 2 two launches with PDL).
A case is SHAPE[@SETS]: SHAPE a layer (mixtral = 2 experts of 4096x14336 q4, mixtral1/4 = 1/4 of them;
qwen35 = 4 of 4096x1024, qwen1/2/8 = 1/2/8 of them); SETS 0 (default) = every call of the graph
reads distinct records (>= --total-gib in all, so the 50 MB L2 holds none of a call's weights),
SETS n = the graph cycles over n record sets (n = 1: the same records every call, in the L2 where
they fit beside the code, and the same pages in the TLB).
Every variant has its own workspace (the barriers' counters differ between builds); each one's
output is checked against the first variant's (torch.equal: the builds must be bit-identical) and
against the float64 reference. Figures: median over --rounds interleaved rounds of µs per layer
(CUDA-graph replay, CUDA events), and per variant a least-squares line µs = fixed + bytes / rate
over the distinct-record cases of each shape family (the fixed cost per layer and the rate).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import statistics
import sys

GiB = 1 << 30
SHAPES = {"mixtral": ("q4", 4096, 14336, 2), "mixtral1": ("q4", 4096, 14336, 1), "mixtral4": ("q4", 4096, 14336, 4),
          "qwen35": ("q4", 4096, 1024, 4), "qwen1": ("q4", 4096, 1024, 1), "qwen2": ("q4", 4096, 1024, 2),
          "qwen8": ("q4", 4096, 1024, 8)}
DEFAULT_CASES = "mixtral,mixtral1,mixtral4,qwen35,qwen1,qwen2,qwen8,qwen35@1,qwen1@1"


def load_build(directory: str):
    """The _kernels_cuda module of a build directory, loaded apart from any other ("tree": the installed)."""
    if directory == "tree":
        import flashmoe_plugin._kernels_cuda as K
        return K
    so = glob.glob(os.path.join(directory, "_kernels_cuda*.so"))
    if not so:
        raise SystemExit(f"no _kernels_cuda*.so in {directory}")
    name = "flashmoe_plugin._kernels_cuda"
    saved = sys.modules.pop(name, None)
    try:
        spec = importlib.util.spec_from_file_location(name, so[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved
    return mod


def parse_variant(spec: str) -> tuple[str, str, dict]:
    build, _, rest = spec.partition(":")
    knobs = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        knobs[k.strip()] = int(v)
    name = build + ("" if not knobs else ":" + ",".join(f"{k}={v}" for k, v in knobs.items()))
    return name, build, knobs


def parse_case(spec: str) -> tuple[str, int]:
    shape, _, sets = spec.partition("@")
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    return shape, int(sets or 0)


def fit_line(points):
    """Least squares us = a + b * MB over (MB, us) points: (fixed us, GB/s) or None."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return {"fixed_us": my - b * mx, "gbps": (1e3 / b) if b > 0 else None, "points": n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--total-gib", type=float, default=1.5)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--label", default="")
    ap.add_argument("--dry-run", action="store_true", help="load the builds and parse; no GPU work")
    a = ap.parse_args(argv)
    builds = {}
    for spec in a.builds:
        name, _, d = spec.partition("=")
        builds[name] = load_build(d or "tree")
    variants = [parse_variant(s) for s in (a.variants or [f"{b}:" for b in builds])]
    for _, b, knobs in variants:
        if b not in builds:
            raise SystemExit(f"variant of unknown build {b!r}")
        for k in knobs:
            if k != "mode":
                builds[b].tune(k)  # raises on an unknown knob now, not mid-run
    cases = [parse_case(s) for s in a.cases.split(",")]
    say = lambda *m: print(f"# {a.label}", *m, file=sys.stderr, flush=True)  # noqa: E731
    say("builds", {n: getattr(m, "__file__", None) for n, m in builds.items()}, "variants", [v[0] for v in variants])
    if a.dry_run:
        return
    import torch

    from flashmoe_plugin.bench.kernels_cuda import _events_time, _records, mem_bandwidth
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.kernels.torch_backend import TorchBackend
    from flashmoe_plugin.store.layout import RecordLayout

    bw = mem_bandwidth(2 * GiB)["copy_gbps"]
    out = {"label": a.label, "device": torch.cuda.get_device_name(), "copy_gbps": bw, "rounds": a.rounds,
           "builds": {n: getattr(m, "__file__", None) for n, m in builds.items()}, "cases": {}}
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def with_knobs(K, knobs, fn):
        knobs = {k: v for k, v in knobs.items() if k != "mode"}
        old = {k: K.tune(k) for k in knobs}
        try:
            for k, v in knobs.items():
                K.tune(k, v)
            return fn()
        finally:
            for k, v in old.items():
                K.tune(k, v)

    for shape, sets in cases:
        fmt, H, I, k = SHAPES[shape]
        layout = RecordLayout.build(fmt, H, I)
        rb = sum(p.nbytes for p in layout.parts)
        distinct = max(2 * k, math.ceil(a.total_gib * GiB / layout.size) // k * k)
        count = distinct if sets == 0 else sets * k
        recs = _records(layout, fmt, count)
        nsets = count // k
        calls = distinct // k  # as many launches per graph either way
        lt = CudaBackend.layout_tuple(layout)
        gen = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(1, H, device="cuda", generator=gen).bfloat16()
        wt = torch.softmax(torch.randn(k, device="cuda", generator=gen), 0)
        yb = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
        ref = TorchBackend().moe_decode(x.double(), [recs[e] for e in range(k)], wt.double(), layout)
        cname = f"{shape}@{sets}"
        entry = {"shape": shape, "sets": sets, "fmt": fmt, "H": H, "I": I, "k": k, "bytes": k * rb,
                 "calls_per_graph": calls, "variants": {}}
        base_out, graphs = None, {}
        for vname, b, knobs in variants:
            K = builds[b]
            ws = torch.zeros(K.workspace_bytes(k, I), dtype=torch.uint8, device="cuda")

            mode = {1: "coop", 2: "two"}[knobs.get("mode", 1)]

            def call(i, y, K=K, ws=ws, mode=mode):
                j = i % nsets
                K.moe([recs[j * k + e] for e in range(k)], lt, wt, x, y, ws, st(), mode=mode)

            def check(call=call, K=K):
                y = torch.empty(1, H, device="cuda")
                call(0, y)
                torch.cuda.synchronize()
                return y, {key: K.tune(key) for key in ("last_grid", "last_stages", "last_smem")}

            def capture(call=call):
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    call(0, yb)
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(calls):
                        call(i, yb)
                g.replay()
                torch.cuda.synchronize()
                return g

            y, last = with_knobs(K, knobs, check)
            err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
            same = True if base_out is None else bool(torch.equal(y, base_out))
            base_out = y if base_out is None else base_out
            graphs[vname] = (with_knobs(K, knobs, capture), ws)
            entry["variants"][vname] = {"build": b, "knobs": knobs, "rel_err": err, "bit_identical_to_first": same,
                                        **last, "us_rounds": []}
            say(f"{cname} {vname}: rel err {err:.2e}, bit-identical to first: {same}, {last}")
        for _ in range(a.rounds):
            for vname, _b, _k in variants:
                g = graphs[vname][0]
                entry["variants"][vname]["us_rounds"].append(_events_time(g.replay, 3) / calls * 1e6)
        for vname, v in entry["variants"].items():
            v["us"] = statistics.median(v["us_rounds"])
            v["gbps"] = entry["bytes"] / (v["us"] * 1e-6) / 1e9
            say(f"{cname} {vname}: {v['us']:.2f} us ({v['gbps']:.0f} GB/s; rounds "
                f"{min(v['us_rounds']):.2f}..{max(v['us_rounds']):.2f})")
        out["cases"][cname] = entry
        if a.json:  # after every case: a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        graphs.clear()
        recs = None
        torch.cuda.empty_cache()
    # fixed cost per layer and streaming rate per variant: a line over each family's distinct cases
    fits = {}
    for fam in ("mixtral", "qwen"):
        for vname, _b, _k in variants:
            pts = [(e["bytes"] / 1e6, e["variants"][vname]["us"]) for e in out["cases"].values()
                   if e["sets"] == 0 and e["shape"].startswith(fam)]
            fits.setdefault(fam, {})[vname] = fit_line(pts)
    out["fits"] = fits
    for fam, fv in fits.items():
        for vname, f in fv.items():
            if f:
                say(f"fit {fam} {vname}: fixed {f['fixed_us']:.2f} us, rate {f['gbps'] or 0:.0f} GB/s "
                    f"over {f['points']} sizes")
    out["copy_gbps_after"] = mem_bandwidth(2 * GiB)["copy_gbps"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    say(f"copy {bw:.0f} / {out['copy_gbps_after']:.0f} GB/s")


if __name__ == "__main__":
    main()
