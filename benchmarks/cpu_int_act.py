"""Integer against fp32 activations in the CPU decode kernels (issue 10): one A/B in one process.

    python benchmarks/cpu_int_act.py [--json FILE] [--rounds 2] [--total-mib 400]

Decode (one token) GEMVs and the Mixtral-shaped fused MoE layer at q4 / q8, each timed with
`set_int_act(True)` (csrc/cpu/fm_kernels_xi.c) and `set_int_act(False)` (the fp32 kernels of
fm_kernels_x86.c) in alternation, over ~400 MiB of distinct weights cycled (out of cache), as
`flashmoe bench --kernels` times them (median of 3 passes); the copy bandwidth at the start and the
end. Errors: max |kernel - float64 reference| / max |reference| for both modes on one call.
Run it alone (the box lock's `quiet`): timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

MiB = 1 << 20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--total-mib", type=float, default=400)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: the pool's)")
    a = ap.parse_args(argv)
    from flashmoe_plugin import quant
    from flashmoe_plugin.bench.kernels import _module, _pass_times, _records, _replicate, mem_bandwidth, random_part
    from flashmoe_plugin.store.layout import RecordLayout

    K = _module()
    if a.threads:
        K.set_num_threads(a.threads)
    total = int(a.total_mib * MiB)
    torch.manual_seed(0)
    cases = []

    def gemv(fmt, rows, cols):
        shape = (rows, cols)
        nb = quant.part_nbytes(fmt, shape)
        template = random_part(fmt, shape)
        parts = _replicate(template, max(2, math.ceil(total / nb)))
        x = torch.randn(1, cols)
        out = torch.empty(1, rows)
        ref = x.double() @ quant.dequantize(template, fmt, shape, torch.float64).T
        fn = lambda i: K.linear(x, parts[i], fmt, shape, out=out)  # noqa: E731
        err = lambda: (K.linear(x, parts[0], fmt, shape).double() - ref).abs().max().item() / ref.abs().max().item()  # noqa: E731
        cases.append((f"gemv {fmt} {rows}x{cols}", fn, len(parts), nb, err))

    def layer(fmt, H, I, k):
        layout = RecordLayout.build(fmt, H, I)
        spec = K.ExpertSpec.from_layout(layout)
        rec_bytes = sum(p.nbytes for p in layout.parts)
        count = max(k, math.ceil(total / layout.size) // k * k)
        recs = _records(layout, count)
        groups = [recs[i * k:(i + 1) * k] for i in range(count // k)]
        x = torch.randn(1, H)
        wts = torch.softmax(torch.randn(k), 0)
        out = torch.zeros(1, H)
        ref = torch.zeros(1, H, dtype=torch.float64)
        for rec, w in zip(groups[0], wts.tolist()):
            w13, w2 = (quant.dequantize(layout.part_bytes(rec, n), layout.part(n).format, layout.part(n).shape,
                                        torch.float64) for n in ("w13", "w2"))
            g, u = (x.double() @ w13.T).chunk(2, dim=-1)
            ref += w * ((F.silu(g) * u) @ w2.T)

        def err():
            o = torch.zeros(1, H)
            K.moe(x, groups[0], wts, spec, o)
            return (o.double() - ref).abs().max().item() / ref.abs().max().item()
        cases.append((f"moe {fmt} H{H}xI{I}xk{k}", lambda i: K.moe(x, groups[i], wts, spec, out), len(groups),
                      k * rec_bytes, err))

    only = set(filter(None, a.only.split(",")))
    specs = [("q4_down", lambda: gemv("q4", 4096, 14336)), ("q4_up", lambda: gemv("q4", 14336, 4096)),
             ("q8_sq", lambda: gemv("q8", 4096, 4096)), ("q8_down", lambda: gemv("q8", 4096, 14336)),
             ("q8_up", lambda: gemv("q8", 14336, 4096)), ("q4_small", lambda: gemv("q4", 4096, 1024)),
             ("moe_q4", lambda: layer("q4", 4096, 14336, 2)), ("moe_q8", lambda: layer("q8", 4096, 14336, 2))]
    result = {"threads": K.get_num_threads(), "isa": K.isa(), "loadavg_start": os.getloadavg()[0],
              "copy_start": mem_bandwidth(256 * MiB), "cases": []}
    for name, make in specs:
        if only and name not in only:
            continue
        cases.clear()
        make()
        label, fn, n, nbytes, err = cases[0]
        row = {"case": label, "bytes": nbytes, "int_gbps": [], "f32_gbps": []}
        for mode in (True, False):
            K.set_int_act(mode)
            row["int_rel_err" if mode else "f32_rel_err"] = err()
        for _ in range(a.rounds):
            for mode in (True, False):
                K.set_int_act(mode)
                t = statistics.median(_pass_times(fn, n, 3))
                row["int_gbps" if mode else "f32_gbps"].append(nbytes / t / 1e9)
        K.set_int_act(True)
        row["speedup"] = statistics.median(row["int_gbps"]) / statistics.median(row["f32_gbps"])
        print(f"{label:28s} int {' '.join(f'{v:5.1f}' for v in row['int_gbps'])}  f32 "
              f"{' '.join(f'{v:5.1f}' for v in row['f32_gbps'])} GB/s  x{row['speedup']:.2f}  "
              f"err int {row['int_rel_err']:.1e} f32 {row['f32_rel_err']:.1e}", flush=True)
        result["cases"].append(row)
        cases.clear()
    result["copy_end"] = mem_bandwidth(256 * MiB)
    result["loadavg_end"] = os.getloadavg()[0]
    result["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"copy {result['copy_start']['copy_gbps']:.1f} -> {result['copy_end']['copy_gbps']:.1f} GB/s, "
          f"load {result['loadavg_start']:.2f} -> {result['loadavg_end']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
