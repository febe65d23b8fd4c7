"""Programmatic dependent launch (FMC_TUNE_PDL) on and off, on the H200 shapes.

    python benchmarks/pdl.py [--json FILE]

Times by CUDA-graph replay over >= 1 GiB of distinct weights (as `flashmoe bench --kernels`):
q4 GEMV 14336x4096 and 4096x14336 (Mixtral w13 rows / w2), 1024x4096 and 4096x1024 (Qwen3.5),
and the Qwen3.5 and Mixtral decode layers (coop: never PDL; two launches: PDL where on). Each
figure has its ratio to the copy bandwidth measured in the same run and the relative error of
one output against a float64 reference.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from flashmoe_plugin import quant
from flashmoe_plugin.bench.kernels_cuda import _fill_parts, _graph_time, _records, mem_bandwidth
from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout

GiB = 1 << 30


def main(argv=None) -> None:
    import flashmoe_plugin._kernels_cuda as K
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--total-gib", type=float, default=1.1)
    a = ap.parse_args(argv)
    total = int(a.total_gib * GiB)
    bw = mem_bandwidth(2 * GiB)["copy_gbps"]
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731 - the capture stream inside a graph
    out = {"device": torch.cuda.get_device_name(), "copy_gbps": bw, "entries": []}

    def emit(e):
        out["entries"].append(e)
        print(f"# {e['what']} pdl={e['pdl']}: {e['us']:.2f} us, {e['ratio_vs_copy']:.3f} of copy, "
              f"grid {e['grid']}, rel err {e['rel_err']:.2e}", file=sys.stderr, flush=True)

    old = K.tune("pdl")
    for (n, k) in ((14336, 4096), (4096, 14336), (1024, 4096), (4096, 1024)):
        nb = quant.part_nbytes("q4", (n, k))
        stride = (nb + 255) // 256 * 256
        count = max(2, math.ceil(total / stride))
        buf = torch.empty(count, stride, dtype=torch.uint8, device="cuda")
        _fill_parts(buf, "q4", (n, k))
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(n, k, device="cuda")
        K.dequant(buf[0], "q4", n, k, w)
        ref = w.double() @ x.double()[0]
        del w
        for pdl in (0, 1):
            K.tune("pdl", pdl)
            t = _graph_time(lambda i: K.linear(buf[i % count], "q4", n, k, x, y, st()), count)
            grid = K.tune("last_grid")
            y32 = torch.empty(1, n, device="cuda")
            K.linear(buf[0], "q4", n, k, x, y32)
            err = ((y32[0].double() - ref).norm() / ref.norm()).item()
            emit({"what": f"gemv q4 {n}x{k}", "pdl": pdl, "us": t * 1e6, "gbps": nb / t / 1e9,
                  "ratio_vs_copy": nb / t / 1e9 / bw, "grid": grid, "rel_err": err})
        buf = None  # noqa: F841 - frees the weights before the next shape
        torch.cuda.empty_cache()
    for (H, I, kx) in ((4096, 1024, 4), (4096, 14336, 2)):
        layout = RecordLayout.build("q4", H, I)
        rb = sum(p.nbytes for p in layout.parts)
        count = max(kx, math.ceil(total / layout.size) // kx * kx)
        recs = _records(layout, "q4", count)
        lt = CudaBackend.layout_tuple(layout)
        x = torch.randn(1, H, device="cuda").bfloat16()
        y = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
        wt = torch.softmax(torch.randn(kx, device="cuda"), 0)
        ws = torch.zeros(K.workspace_bytes(kx, I), dtype=torch.uint8, device="cuda")
        calls = count // kx
        from flashmoe_plugin.kernels.torch_backend import TorchBackend
        ref = TorchBackend().moe_decode(x.double(), [recs[e] for e in range(kx)], wt.double(), layout)
        for pdl in (0, 1):
            K.tune("pdl", pdl)
            for mode in ("coop", "two"):
                t = _graph_time(lambda i: K.moe([recs[(i % calls) * kx + e] for e in range(kx)], lt, wt, x, y, ws,
                                                st(), mode=mode), calls)
                grid = K.tune("last_grid")
                y32 = torch.empty(1, H, device="cuda")
                K.moe([recs[e] for e in range(kx)], lt, wt, x, y32, ws, st(), mode=mode)
                err = ((y32.double() - ref).norm() / ref.norm()).item()
                emit({"what": f"moe_decode_layer q4 H{H}xI{I}xk{kx} {mode}", "pdl": pdl,
                      "us": t * 1e6, "gbps": kx * rb / t / 1e9, "ratio_vs_copy": kx * rb / t / 1e9 / bw, "grid": grid,
                      "rel_err": err})
        recs = None  # noqa: F841
        torch.cuda.empty_cache()
    K.tune("pdl", old)
    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
