"""What --dense-quant costs and saves per decode token on CPU, Mixtral-8x7B shapes: the dense
matrices one token multiplies (32 layers of q 4096x4096, k and v 1024x4096, o 4096x4096, and the
32000x4096 output head; 1.47 G weights, several GiB of distinct memory, so the figures are RAM
reads, not cache hits) through models.layers.linear, per mode:

    none  fp32 tensors and torch's F.linear (the CPU default for float stores)
    bf16  a store's bf16 kept as stored (`keep` on a bf16 store), fp32 activations, our C kernel
    q8/q4 our group formats (`--dense-quant q8|q4`)
    q4_0/q8_0  a GGUF's blocks (`keep` on a GGUF; Mixtral Q4_0 files hold attention in Q4_0 and
          the head in Q8_0 or Q6_K)

Weights are random bytes (speed does not depend on the values). One mode is resident at a time.
Prints JSON (bytes held, seconds per token, GB/s of weight bytes). Run alone (the quiet lock):

    python benchmarks/dense_quant_speed.py --steps 5 > benchmarks/results/devbox-dense-quant-speed.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from flashmoe_plugin import kernels, quant
from flashmoe_plugin.kernels.packed import PackedWeight
from flashmoe_plugin.models.layers import linear

LAYERS = int(__import__("os").environ.get("DQ_LAYERS", 32))
SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)] * LAYERS + [(32000, 4096)]
SCALES = {"q4_0": 0, "q8_0": 0}  # byte offset of each block's f16 scale


def random_part(fmt: str, shape, g) -> torch.Tensor:
    n = quant.part_nbytes(fmt, shape)
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if fmt in quant.QUANT_BITS:  # finite fp16 scales (and biases)
        for name, v in quant.views(buf, fmt, shape).items():
            if name != "q":
                v.copy_((torch.randn(v.shape, generator=g) * 0.01).half())
    elif fmt in SCALES:
        from flashmoe_plugin.quant_gguf import BLOCK_FORMATS
        size = BLOCK_FORMATS[fmt][2]
        blocks = buf.view(-1, size)
        blocks[:, :2].copy_((torch.randn(len(blocks), generator=g) * 0.01).half().view(-1, 1).view(torch.uint8))
    return buf


def weights(mode: str, be, g):
    if mode == "none":
        return [torch.randn(s, generator=g) * 0.02 for s in SHAPES]
    fmt = {"bf16": "bf16"}.get(mode, mode)
    out = []
    for i, s in enumerate(SHAPES):
        f = "q8_0" if mode == "q4_0" and i == len(SHAPES) - 1 else fmt  # Q4_0 files: Q8_0 head (ours too)
        out.append(PackedWeight(random_part(f, s, g), f, s, be, torch.float32))
    return out


def nbytes(ws) -> int:
    return sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes for w in ws)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--modes", default="none,bf16,q8,q4,q8_0,q4_0")
    a = ap.parse_args()
    be = kernels.select("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, generator=g)
    res = {"what": __doc__.split("\n\n")[0], "threads": torch.get_num_threads(), "backend": be.name,
           "loadavg_before": open("/proc/loadavg").read().split()[:3], "modes": {}}
    for mode in a.modes.split(","):
        ws = weights(mode, be, g)
        for w in ws:  # warm: page the weights in, first-call costs
            linear(x, w)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            for w in ws:
                linear(x, w)
        s = (time.perf_counter() - t0) / a.steps
        b = nbytes(ws)
        res["modes"][mode] = {"bytes": b, "s_per_token": s, "weight_gbps": b / s / 1e9}
        print(mode, res["modes"][mode], file=sys.stderr, flush=True)
        del ws
        gc.collect()
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
