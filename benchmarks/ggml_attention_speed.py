"""The attention in llama.cpp's float order (kernels/ggml_numerics.py, csrc/cpu/fm_ggml_f32.c: what
a GGUF computes on the CPU) against torch's SDPA on the same tensors, Mixtral-8x7B shapes (32
heads, 8 KV heads, head_dim 128), one layer: a prefill of 512 tokens and a decode step at 2048 keys.

    python benchmarks/ggml_attention_speed.py [--threads 2] [--out benchmarks/results/devbox-ggml-attention-speed.json]"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashmoe_plugin import _gguf_kernels as K


def timed(f, n):
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - t0) / n * 1e3, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/devbox-ggml-attention-speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    H, Hkv, d = 32, 8, 128
    rows = {}
    for name, T, start, n in (("prefill 512 tokens", 512, 0, 3), ("decode step at 2048 keys", 1, 2048, 50)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(T if i == 0 else start + T, H if i == 0 else Hkv, d, generator=g) for i in range(3))
        mask = torch.arange(start + T)[None, :] <= torch.arange(start, start + T)[:, None] if T > 1 else None
        rows[name] = {
            "llama.cpp order (ms)": timed(lambda: K.attention(q, k, v, start, d ** -0.5, True), n),
            "torch SDPA (ms)": timed(lambda: F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
                enable_gqa=True), n)}
    out = {"shapes": {"heads": H, "kv_heads": Hkv, "head_dim": d}, "threads": args.threads,
           "machine": platform.processor() or platform.machine(), "loadavg": open("/proc/loadavg").read().split()[:3],
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
