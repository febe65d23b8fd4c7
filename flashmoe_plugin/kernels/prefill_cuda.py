"""Prefill on tensor cores: the grouped mixed-input GEMM of flashmoe_plugin._prefill_cuda
(csrc/cuda/fm_prefill.cu) for all of a layer's experts at once.

Tokens arrive grouped per expert; one launch computes silu(x W1.T) * (x W3.T) for every expert
(the SwiGLU in the GEMM's epilogue) and a second one the down projections, on mma.sync (bf16 in,
fp32 accumulation): an expert's cost grows with its tokens and no bf16 weight matrix is ever
written. q4 multiplies its integer codes (as bf16 128 + q, made by bit operations) and applies
each group's scale and bias to the fp32 sums; q8 dequantizes each weight in registers. The CPU
twin is Backend.grouped_ffn (dequantize + matmul per expert), which the tests compare it with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from . import compiled

variant = "auto"
"""The kernel variant (_prefill_cuda.VARIANTS): "auto", or "dequant" for comparisons."""


def kernels():
    """The compiled module, or None (built without nvcc)."""
    return compiled("_prefill_cuda")[0]


def supports(x: torch.Tensor, layout) -> bool:
    """Whether grouped_ffn computes this: bf16 activations on a GPU, q4 or q8 experts of the
    plain SwiGLU layout, the compiled module present."""
    if x.dtype != torch.bfloat16 or not x.is_cuda or kernels() is None:
        return False
    fmts = {p.format for p in layout.parts}
    return fmts in ({"q4"}, {"q8"}) and {p.name for p in layout.parts} == {"w13", "w2"}


def _sections(part) -> tuple[int, int]:
    secs = {s.name: s.offset for s in quant.sections(part.format, part.shape)}
    return secs["scales"], secs.get("biases", 0)


def permute8(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] with each 8 consecutive elements in the order 0,4,1,5,2,6,3,7 (what the q4 kernel
    reads: its bit operations yield weight pairs (i, i+4))."""
    T, K = x.shape
    return x.view(T, K // 8, 2, 4).transpose(2, 3).reshape(T, K)


def grouped_ffn(x: torch.Tensor, records: list[torch.Tensor], counts, layout, most: int | None = None) -> torch.Tensor:
    """x [sum(counts), H] bf16, tokens grouped per expert (counts[i] rows for records[i]) ->
    [sum(counts), H]: each group through its expert's SwiGLU FFN. counts: a list, or an integer
    tensor on x's device (nothing is read back; `most`, default all of x's rows, bounds a count
    and sizes the grid: token tiles past an expert's count end at once)."""
    g = kernels()
    dev = x.device
    E = len(records)
    T = x.shape[0]
    if isinstance(counts, torch.Tensor):
        most = min(most or T, T)
        offs = torch.zeros(E + 1, dtype=torch.int32, device=dev)
        offs[1:] = counts.cumsum(0)
        host = []
    else:
        most = max(counts)
        host = [0]
        for c in counts:
            host.append(host[-1] + int(c))
    # one small host-to-device copy carries the record addresses (and the token offsets)
    meta = torch.tensor([r.data_ptr() for r in records] + host, dtype=torch.int64).pin_memory()
    meta = meta.to(dev, non_blocking=True)
    addrs = meta[:E]
    if host:
        offs = meta[E:].to(torch.int32)
    p13, p2 = layout.part("w13"), layout.part("w2")
    H, I = layout.hidden, layout.intermediate
    perm = p13.format == "q4" and variant != "dequant"
    x = permute8(x) if perm else x.contiguous()
    fused = I % (g.TILE_ROWS // 2) == 0
    h = torch.empty((T, I if fused else 2 * I), dtype=x.dtype, device=dev)
    g.grouped_gemm(p13.format, addrs, p13.offset, _sections(p13), 2 * I, H, offs, most, x, h, swiglu=fused,
                   variant=variant)
    if not fused:  # the SwiGLU in torch (written permuted by the kernel only when fused)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        h = permute8(h) if perm else h.contiguous()
    y = torch.empty((T, H), dtype=x.dtype, device=dev)
    g.grouped_gemm(p2.format, addrs, p2.offset, _sections(p2), H, I, offs, most, h, y, variant=variant)
    return y
