"""Device time of the fused decode kernels (csrc/cuda/fm_decode.cu) on Mixtral-8x7B shapes, bf16:
each kernel launched R times back to back inside one CUDA graph, the graph replayed and timed
with CUDA events (median of the replays), with programmatic dependent launch on and off.
Prints one JSON object. Usage: python benchmarks/fused_decode_kernels.py [--reps 50]"""
from __future__ import annotations

import argparse
import json
import math

import torch

from flashmoe_plugin.kernels import decode_cuda as k


def _time(fn, reps: int, replays: int = 20) -> float:
    """Microseconds per call of fn, from a graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    n, heads, kvh, hd, E, top_k = 4096, 32, 8, 128, 8, 2
    h, d, w = (torch.randn(1, n, device=dev, dtype=dt) for _ in range(3))
    out = torch.empty_like(h)
    rw = torch.randn(E, n, device=dev, dtype=dt) / 64
    ids = torch.zeros(top_k, dtype=torch.long, device=dev)
    entries, base = torch.arange(E, device=dev), torch.tensor([1 << 40], device=dev)
    router = k.Router(E, dev)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    qkv = torch.randn(1, (heads + 2 * kvh) * hd, device=dev, dtype=dt)
    res = {"shapes": dict(hidden=n, heads=heads, kv_heads=kvh, head_dim=hd, experts=E, top_k=top_k, dtype="bf16"),
           "reps_per_graph": args.reps, "device": torch.cuda.get_device_name(), "us": {}}
    for pdl in (1, 0):
        k.module().pdl(pdl)
        r = res["us"][f"pdl{pdl}"] = {}
        r["add_norm"] = _time(lambda: k.add_norm(h, d, out, w, 1e-5), args.reps)
        r["route"] = _time(lambda: router.run(h, d, out, w, rw, ids, entries, base, 4096, top_k, True, 1e-5),
                           args.reps)
        for n_ctx in (584, 4096, 32768):
            K = torch.randn(n_ctx, kvh, hd, device=dev, dtype=dt)
            V = torch.randn(n_ctx, kvh, hd, device=dev, dtype=dt)
            pos = torch.tensor([n_ctx - 8], device=dev)
            att = k.Attention(kvh, heads, hd, n_ctx, dev)
            r[f"attention_ctx{n_ctx}_splits{att.splits}"] = _time(
                lambda: att.run(qkv, None, None, "none", None, inv_freq, pos, K, V, heads, kvh, hd, 0, 1e-5,
                                1 / math.sqrt(hd)), args.reps)
            # bytes: the K/V of pos keys of every head, read once
            r[f"attention_ctx{n_ctx}_kv_bytes"] = 2 * (n_ctx - 7) * kvh * hd * 2
    k.module().pdl(1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
