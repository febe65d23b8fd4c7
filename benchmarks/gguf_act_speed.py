"""GGUF block-format kernels: llama.cpp's quantized activations (act="q8", the CPU default) against
fp32 activations (act="f32") on the same random blocks, Mixtral-8x7B-sized matrices.

    python benchmarks/gguf_act_speed.py [--threads 2] [--out benchmarks/results/devbox-gguf-act-speed.json]

Per format: one linear [4096 x 4096] at T=1 (decode) and T=64 (prefill), and one fused MoE decode
step (2 experts of 4096 x 14336, T=1). Median of repeated runs, GB/s of weight bytes read. Timings on
a shared machine are noisy: run it alone (the dev box: under /work/helpers/quiet)."""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gguf_oracles import gguf_layout, random_part  # noqa: E402

from flashmoe_plugin import _gguf_kernels as K  # noqa: E402
from flashmoe_plugin import quant_gguf  # noqa: E402


def median_s(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="q4_0,q8_0,q4_k,q6_k,mxfp4")
    ap.add_argument("--out", default="benchmarks/results/devbox-gguf-act-speed.json")
    a = ap.parse_args()
    K.set_num_threads(a.threads)
    H, I = 4096, 14336
    rows = []
    for fmt in a.formats.split(","):
        w = random_part(fmt, H, H, seed=1)
        nbytes = quant_gguf.part_nbytes(fmt, (H, H))
        for T in (1, 64):
            x = torch.randn(T, H)
            r = {"format": fmt, "op": "linear", "shape": [H, H], "T": T}
            for act in ("f32", "q8"):
                s = median_s(lambda: K.linear(x, w, fmt, (H, H), act=act), 7 if T == 1 else 3)
                r[act] = {"ms": round(s * 1e3, 3), "weight_GBps": round(nbytes / s / 1e9, 2)}
            r["speedup_q8"] = round(r["f32"]["ms"] / r["q8"]["ms"], 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
        lay = gguf_layout(fmt, fmt, H, I)
        recs = []
        for e in range(2):
            rec = torch.zeros(lay.size, dtype=torch.uint8)
            rec[:lay.part("w13").nbytes] = random_part(fmt, 2 * I, H, seed=10 + e)
            p2 = lay.part("w2")
            rec[p2.offset:p2.offset + p2.nbytes] = random_part(fmt, H, I, seed=20 + e)
            recs.append(rec)
        spec = ((fmt, 0, (2 * I, H)), (fmt, lay.part("w2").offset, (H, I)))
        x = torch.randn(1, H) * 0.1
        mb = 2 * (lay.part("w13").nbytes + lay.part("w2").nbytes)
        r = {"format": fmt, "op": "moe_decode", "experts": 2, "H": H, "I": I, "T": 1}
        for act in ("f32", "q8"):
            s = median_s(lambda: K.moe(x, recs, [0.6, 0.4], spec, torch.zeros(1, H), act=act), 5)
            r[act] = {"ms": round(s * 1e3, 3), "weight_GBps": round(mb / s / 1e9, 2)}
        r["speedup_q8"] = round(r["f32"]["ms"] / r["q8"]["ms"], 2)
        rows.append(r)
        print(json.dumps(r), flush=True)
    res = {"machine": platform.processor() or platform.machine(), "isa": K.isa(), "threads": a.threads,
           "loadavg_before": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
           "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
