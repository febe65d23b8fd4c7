"""The decode MoE layer's kernel variants side by side (issue 9): one H200 measurement.

    python benchmarks/expert_layer_ab.py [--json FILE] [--label NAME] [--variants SPEC ...] [--trace]
    FMC_KERNELS_SO=/path/_kernels_cuda....so python benchmarks/expert_layer_ab.py --variants main:

A variant is NAME:KEY=VALUE,KEY=VALUE,... of `_kernels_cuda.tune` knobs (e.g. "ring4:stages=4").
For each layer (Mixtral-8x7B: 2 experts of 4096x14336 q4; Qwen3.5: 4 of 4096x1024 q4) every variant
is captured in its own CUDA graph over >= --total-gib of distinct records, then the graphs are
replayed in interleaved rounds (A B C A B C ...), so that drift of the machine falls on all of
them alike; the figure is the median over rounds of µs per layer. Every variant's output is checked
bit-identical to the first variant's (same build) and against the float64 reference; its SHA-256
(out_sha256) lets two builds' outputs be compared across processes.
--trace: one more graph per variant with the kernel's timeline trace on (tune("trace")): per phase,
the µs since the launch's first block started (medians over blocks; A = gate/up, B = down).
FMC_KERNELS_SO swaps in another build (expert_kernels.swap), e.g. main's, for the "before" figures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import expert_kernels  # noqa: E402  (swap)

GiB = 1 << 30
LAYERS = {"mixtral": ("q4", 4096, 14336, 2), "qwen35": ("q4", 4096, 1024, 4)}
DEFAULT_VARIANTS = ["auto:"]
TRACE_SLOTS = 40


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    knobs = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        knobs[k.strip()] = int(v)
    return name, knobs


def trace_summary(buf, grid: int) -> dict:
    """Phase times (µs after the first block's start) from one launch's trace."""
    t = buf[:grid].double()
    t0 = t[:, 0].min()
    us = ((t - t0) / 1e3).masked_fill(t == 0, float("nan"))  # slots a block did not reach (no rows)
    med = lambda v: float(v.nanmedian())  # noqa: E731
    a_end, b_end = us[:, 2:18], us[:, 20:36]
    return {"start_med": med(us[:, 0]), "start_max": float(us[:, 0].max()),
            "a_x_ready_med": med(us[:, 1]),
            "a_first_warp_done": float(a_end.min()), "a_block_first_warp_med": med(a_end.min(1).values),
            "a_block_last_warp_med": med(a_end.max(1).values), "a_last_warp_done": float(a_end.max()),
            "barrier_passed_med": med(us[:, 18]), "barrier_passed_max": float(us[:, 18].max()),
            "b_x_ready_med": med(us[:, 19]), "b_x_ready_max": float(us[:, 19].nan_to_num(-1).max()),
            "b_block_last_warp_med": med(b_end.max(1).values), "end": float(b_end.max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--label", default="")
    ap.add_argument("--layers", default="mixtral,qwen35")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--mode", default="coop", choices=["coop", "two", "auto"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--total-gib", type=float, default=1.5)
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args(argv)
    so = expert_kernels.swap()
    import torch

    import flashmoe_plugin._kernels_cuda as K
    from flashmoe_plugin.bench.kernels_cuda import _events_time, _records, mem_bandwidth
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.kernels.torch_backend import TorchBackend
    from flashmoe_plugin.store.layout import RecordLayout

    variants = [parse_variant(s) for s in a.variants]
    bw = mem_bandwidth(2 * GiB)["copy_gbps"]
    out = {"label": a.label, "kernels_so": so, "device": torch.cuda.get_device_name(), "copy_gbps": bw,
           "mode": a.mode, "rounds": a.rounds, "layers": {}}
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    say = lambda *m: print(f"# {a.label}", *m, file=sys.stderr, flush=True)  # noqa: E731

    def with_knobs(knobs, fn):
        old = {k: K.tune(k) for k in knobs}
        try:
            for k, v in knobs.items():
                K.tune(k, v)
            return fn()
        finally:
            for k, v in old.items():
                K.tune(k, v)

    for name in a.layers.split(","):
        fmt, H, I, k = LAYERS[name]
        layout = RecordLayout.build(fmt, H, I)
        rb = sum(p.nbytes for p in layout.parts)
        count = max(2 * k, math.ceil(a.total_gib * GiB / layout.size) // k * k)
        recs = _records(layout, fmt, count)
        calls = count // k
        lt = CudaBackend.layout_tuple(layout)
        gen = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(1, H, device="cuda", generator=gen).bfloat16()
        wt = torch.softmax(torch.randn(k, device="cuda", generator=gen), 0)
        ws = torch.zeros(K.workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
        yb = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
        ref = TorchBackend().moe_decode(x.double(), [recs[e] for e in range(k)], wt.double(), layout)

        def call(i, y):
            K.moe([recs[(i % calls) * k + e] for e in range(k)], lt, wt, x, y, ws, st(), mode=a.mode)

        entry = {"fmt": fmt, "H": H, "I": I, "k": k, "bytes": k * rb, "calls_per_graph": calls, "variants": {}}
        base_out = None
        graphs = {}
        for vname, knobs in variants:
            def check():
                y = torch.empty(1, H, device="cuda")
                call(0, y)
                torch.cuda.synchronize()
                return y, {key: K.tune(key) for key in ("last_grid", "last_stages", "last_smem")}
            y, last = with_knobs(knobs, check)
            err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
            same = True if base_out is None else bool(torch.equal(y, base_out))
            base_out = y if base_out is None else base_out
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())

            def capture():
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
            graphs[vname] = with_knobs(knobs, capture)
            sha = hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest()
            v = {"knobs": knobs, "rel_err": err, "bit_identical_to_first": same, "out_sha256": sha, **last,
                 "us_rounds": []}
            if a.trace and "trace" in K._TUNE_KEYS:
                tb = torch.zeros(4096 * TRACE_SLOTS, dtype=torch.int64, device="cuda")
                gt = with_knobs({**knobs, "trace": tb.data_ptr()}, capture)
                gt.replay()
                torch.cuda.synchronize()
                v["trace"] = trace_summary(tb.view(-1, TRACE_SLOTS), last["last_grid"])
                del gt
            entry["variants"][vname] = v
            say(f"{name} {vname}: rel err {err:.2e}, bit-identical to first: {same}, {last}")
        for r in range(a.rounds):
            for vname, _ in variants:
                entry["variants"][vname]["us_rounds"].append(_events_time(graphs[vname].replay, 3) / calls * 1e6)
        for vname, v in entry["variants"].items():
            v["us"] = statistics.median(v["us_rounds"])
            v["ratio_vs_copy"] = entry["bytes"] / (v["us"] * 1e-6) / 1e9 / bw
            tr = v.get("trace")
            say(f"{name} {vname}: {v['us']:.2f} us ({v['ratio_vs_copy']:.3f} of copy; rounds "
                f"{min(v['us_rounds']):.2f}..{max(v['us_rounds']):.2f})"
                + (f" trace: A x {tr['a_x_ready_med']:.1f}, A warps {tr['a_first_warp_done']:.1f}.."
                   f"{tr['a_last_warp_done']:.1f}, barrier {tr['barrier_passed_med']:.1f}, B x {tr['b_x_ready_med']:.1f},"
                   f" end {tr['end']:.1f}" if tr else ""))
        out["layers"][name] = entry
        graphs.clear()
        recs = None
        torch.cuda.empty_cache()
    out["copy_gbps_after"] = mem_bandwidth(2 * GiB)["copy_gbps"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    say(f"copy {bw:.0f} / {out['copy_gbps_after']:.0f} GB/s")


if __name__ == "__main__":
    main()
