"""The dense GEMVs of a decode token at the memory bound (issue 9): the decode GEMV
(csrc/cuda/fm_gemv.cu, `gemv`) against fmc_linear (`linear`, the path before it), same build.

    python benchmarks/dense_gemv.py [--json FILE] [--tokens 1,4] [--splits 1,2,4,8] [--kernels 1,2,3]
                                    [--grids 132,264]

Shapes (rows x cols, q8 and q4): Mixtral's q/k/v stacked (4096 + 1024 + 1024 rows: old = three
linear launches + torch.cat, new = one gemv over the three parts where they lie), o 4096x4096,
k/v 1024x4096, lm_head 32000x4096, and the dense MLPs of other families 14336x4096 / 4096x14336.
Timed as `flashmoe bench --kernels` times kernels: CUDA-graph replay over >= 1.1 GiB of distinct
weights (so nothing is served from L2), median of 5, against the copy bandwidth of the same run.
Errors: ||y - ref|| / ||ref|| against the float64 product of the dequantized weights, and the
largest |gemv - linear| (the same arithmetic, another summation order).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

GiB = 1 << 30

SHAPES = [("qkv", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("kv", (1024,), 4096),
          ("lm_head", (32000,), 4096), ("mlp_up", (14336,), 4096), ("mlp_down", (4096,), 14336)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--total-gib", type=float, default=1.1)
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--formats", default="q8,q4")
    ap.add_argument("--shapes", default=",".join(n for n, _, _ in SHAPES), help="which of the shapes")
    ap.add_argument("--splits", default="", help="at one token, also time these gemv splits (gemv_tune('split'))")
    ap.add_argument("--kernels", default="", help="also time these gemv kernels (gemv_tune('kernel'): 1 a block "
                    "per item, 2/3 the persistent grid at 2/3 blocks per SM)")
    ap.add_argument("--grids", default="", help="at one token, also time the persistent grid capped at these blocks")
    a = ap.parse_args(argv)
    import torch

    import flashmoe_plugin._kernels_cuda as K
    from flashmoe_plugin import quant
    from flashmoe_plugin.bench.kernels_cuda import _fill_parts, _graph_time, mem_bandwidth

    bw = mem_bandwidth(2 * GiB)["copy_gbps"]
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731 - the capture stream inside a graph
    out = {"device": torch.cuda.get_device_name(), "copy_gbps": bw, "entries": []}
    splits = [int(v) for v in a.splits.split(",") if v]
    kernels = [int(v) for v in a.kernels.split(",") if v]
    grids = [int(v) for v in a.grids.split(",") if v]

    for fmt in a.formats.split(","):
        for name, rows, k in [sh for sh in SHAPES if sh[0] in a.shapes.split(",")]:
            nbs = [quant.part_nbytes(fmt, (r, k)) for r in rows]
            nb = sum(nbs)
            count = max(2, math.ceil(a.total_gib * GiB / nb))
            bufs = []
            for r, b in zip(rows, nbs):
                buf = torch.empty(count, (b + 255) // 256 * 256, dtype=torch.uint8, device="cuda")
                _fill_parts(buf, fmt, (r, k))
                bufs.append(buf)
            n = sum(rows)
            w = torch.cat([quant.dequantize(bf[0, :b], fmt, (r, k), torch.float32) for bf, r, b in zip(bufs, rows, nbs)])
            for T in [int(v) for v in a.tokens.split(",")]:
                x = torch.randn(T, k, device="cuda").bfloat16()
                ref = x.double() @ w.double().T
                y32 = torch.empty(T, n, device="cuda")
                K.gemv([bf[0] for bf in bufs], fmt, list(rows), k, x, y32)
                old32 = torch.cat([K.linear(bf[0], fmt, r, k, x, torch.empty(T, r, device="cuda"))
                                   for bf, r in zip(bufs, rows)], dim=-1)
                rel = ((y32.double() - ref).norm() / ref.norm()).item()
                rel_old = ((old32.double() - ref).norm() / ref.norm()).item()
                diff = (y32 - old32).abs().max().item()
                ys = [torch.empty(T, r, dtype=torch.bfloat16, device="cuda") for r in rows]
                y = torch.empty(T, n, dtype=torch.bfloat16, device="cuda")

                def old(i):
                    for bf, r, yy in zip(bufs, rows, ys):
                        K.linear(bf[i % count], fmt, r, k, x, yy, st())
                    if len(rows) > 1:
                        torch.cat(ys, dim=-1)

                def new(i):
                    K.gemv([bf[i % count] for bf in bufs], fmt, list(rows), k, x, y, st())

                def emit(what, t, extra=None):
                    e = {"what": f"{name} {fmt} {n}x{k} T{T} {what}", "shape": [n, k], "parts": list(rows), "fmt": fmt,
                         "tokens": T, "us": t * 1e6, "bytes": nb, "gbps": nb / t / 1e9,
                         "ratio_vs_copy": nb / t / 1e9 / bw, "rel_err": rel if what != "old" else rel_old,
                         "max_abs_diff_vs_old": diff, **(extra or {})}
                    out["entries"].append(e)
                    print(f"# {e['what']}: {e['us']:.2f} us, {e['gbps']:.0f} GB/s, {e['ratio_vs_copy']:.3f} of copy, "
                          f"rel err {e['rel_err']:.2e}" + (f" {extra}" if extra else ""), file=sys.stderr, flush=True)

                emit("old", _graph_time(old, count), {"grid": K.tune("last_grid"), "launches": len(rows) +
                                                       (len(rows) > 1)})
                t = _graph_time(new, count)
                emit("new", t, {"split": K.gemv_tune("last_split"), "warps": K.gemv_tune("last_warps"),
                                "grid": K.gemv_tune("last_grid"), "kernel": K.gemv_tune("last_kernel"), "launches": 1})
                for kn in kernels:
                    K.gemv_tune("kernel", kn)
                    emit(f"new kernel {kn}", _graph_time(new, count), {"kernel": kn, "grid": K.gemv_tune("last_grid")})
                K.gemv_tune("kernel", 0)
                for g in grids if T == 1 else []:
                    K.gemv_tune("grid", g)
                    emit(f"new grid {g}", _graph_time(new, count), {"grid": K.gemv_tune("last_grid")})
                K.gemv_tune("grid", 0)
                # As in a decode step, where another kernel runs between the GEMVs (no overlap of one
                # GEMV's tail with the next one's loads): a tiny elementwise kernel after each launch.
                z = torch.zeros(256, device="cuda")

                def gapped(i):
                    new(i)
                    z.add_(1.0)
                for kn in ([1] if kernels else []) + [0]:
                    K.gemv_tune("kernel", kn)
                    emit(f"new gap kernel {kn}", _graph_time(gapped, count), {"kernel": K.gemv_tune("last_kernel"),
                                                                              "grid": K.gemv_tune("last_grid")})
                K.gemv_tune("kernel", 0)
                for s in splits if T == 1 else []:
                    K.gemv_tune("split", s)
                    for kn in [0] + kernels:
                        K.gemv_tune("kernel", kn)
                        emit(f"new split {s} kernel {kn}", _graph_time(new, count),
                             {"split": s, "kernel": K.gemv_tune("last_kernel"), "grid": K.gemv_tune("last_grid")})
                    K.gemv_tune("kernel", 0)
                K.gemv_tune("split", 0)
            del bufs, w
            torch.cuda.empty_cache()

    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(f"copy {bw:.0f} GB/s", file=sys.stderr)


if __name__ == "__main__":
    main()
