"""The attention block of a decode token (between the q/k/v and the o products) on the GPU: the
torch formula as the graph path ran it (runtime/decode_ops.attend through torch.compile with
decode_ops.Ops' inductor settings: RoPE with the K/V writes, scores, softmax, p @ V) against the
one-kernel version (csrc/cuda/fm_attn.cu), Mixtral shapes by default (32 heads, 8 KV heads,
head_dim 128, bf16).

Each timing: LAYERS calls (one per layer, each on its own cache, as a token runs them) captured
in one CUDA graph, replayed REPS times between CUDA events: us per layer, launch gaps included as
a captured decode step has them. Positions: a few up to n_ctx - 1; at the last position the
kernel's knobs one at a time (splits, the cluster merge off, PDL modes), and once the floor: a
graph of LAYERS one-element torch kernels (us per launch, what any kernel in the chain costs).

    python3 benchmarks/decode_attention.py [--n-ctx 552 8192] [--no-torch] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from flashmoe_plugin.kernels import decode_attention as fa
from flashmoe_plugin.runtime.decode_ops import Ops, attend, rope_tables


def graph_us(fn, layers: int, reps: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(layers):
            fn(i)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for i in range(layers):
                fn(i)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-ctx", type=int, nargs="+", default=[552, 8192])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--splits", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128], help="the knob's sweep")
    ap.add_argument("--no-torch", action="store_true", help="the kernel alone (not the torch formula)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if fa._km is None or not torch.cuda.is_available():
        sys.exit("needs a GPU and flashmoe_plugin._attn_cuda")
    dt, H, KVH, D, L = torch.bfloat16, a.heads, a.kv_heads, a.head_dim, a.layers
    Ops.get(compile=True)  # inductor's settings as the decode step uses them
    torch_block = torch.compile(attend, dynamic=False, fullgraph=True)
    scale = 1.0 / math.sqrt(D)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    res = {"shape": {"heads": H, "kv_heads": KVH, "head_dim": D, "dtype": "bfloat16", "layers": L},
           "device": torch.cuda.get_device_name(), "rows": []}
    one = torch.zeros(L, device="cuda")
    res["floor_us"] = graph_us(lambda i: one[i:i + 1].add_(1), L, a.reps)  # a launch in a graph, nothing else
    print(json.dumps({"floor_us": res["floor_us"]}), file=sys.stderr)

    def knob(key, value=None):  # None where the module has no such knob (an older build: before/after runs)
        try:
            return fa.tune(key, value)
        except ValueError:
            return None
    for n_ctx in a.n_ctx:
        K = torch.randn(L, n_ctx, KVH, D, device="cuda", dtype=dt)
        V = torch.randn_like(K)
        q = torch.randn(L, 1, H, D, device="cuda", dtype=dt)
        k = torch.randn(L, 1, KVH, D, device="cuda", dtype=dt)
        v = torch.randn(L, 1, KVH, D, device="cuda", dtype=dt)
        kpos = torch.arange(n_ctx, device="cuda")
        pos = torch.zeros(1, dtype=torch.long, device="cuda")
        cos, sin = rope_tables(pos, inv_freq, dt)

        def old(i):
            return torch_block(q[i], k[i], v[i], cos, sin, K[i], V[i], pos, kpos, 0, scale)

        def new(i):
            return fa.decode_attention(q[i].reshape(1, -1), k[i].reshape(1, -1), v[i].reshape(1, -1), cos, sin,
                                       K[i], V[i], pos, 0, scale)

        for p in sorted({0, 63, n_ctx // 2, n_ctx - 1}):
            pos.fill_(p)
            c, s_ = rope_tables(pos, inv_freq, dt)
            cos.copy_(c)
            sin.copy_(s_)
            row = {"n_ctx": n_ctx, "pos": p}
            if not a.no_torch:
                row["torch_us"] = graph_us(old, L, a.reps)
            row.update(kernel_us=graph_us(new, L, a.reps), splits=fa.tune("last_splits"), grid=fa.tune("last_grid"),
                       cluster=knob("last_cluster"))
            if not a.no_torch:
                ref, out = old(0), new(0)
                row["max_abs_diff"] = (ref.float() - out.float()).abs().max().item()
            res["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
        for splits in a.splits:  # the knob at the last position (auto: 0)
            fa.tune("splits", splits)
            row = {"n_ctx": n_ctx, "pos": n_ctx - 1, "splits_knob": splits, "kernel_us": graph_us(new, L, a.reps),
                   "cluster": knob("last_cluster")}
            res["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
        fa.tune("splits", 0)
        cctx = knob("cluster_ctx")
        if cctx is not None:  # the merge by the last block (global memory) or in the cluster, whichever auto is not
            knob("cluster_ctx", 0 if n_ctx <= cctx else n_ctx)
            row = {"n_ctx": n_ctx, "pos": n_ctx - 1, "cluster_ctx": knob("cluster_ctx"), "kernel_us": graph_us(new, L, a.reps),
                   "splits": fa.tune("last_splits"), "cluster": knob("last_cluster")}
            knob("cluster_ctx", cctx)
            res["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
        # PDL off; where the module knows them 2: the next launch let start after the wait, 3: no loads over it
        pdl = fa.tune("pdl", 0)
        for mode in (0, 2, 3) if knob("cluster_ctx") is not None else (0,):
            fa.tune("pdl", mode)
            for p in (0, n_ctx - 1):
                pos.fill_(p)
                row = {"n_ctx": n_ctx, "pos": p, "pdl": mode, "kernel_us": graph_us(new, L, a.reps)}
                res["rows"].append(row)
                print(json.dumps(row), file=sys.stderr)
        fa.tune("pdl", pdl)
        del K, V
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
