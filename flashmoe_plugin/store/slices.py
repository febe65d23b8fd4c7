"""An expert record cut along its intermediate dimension into q slices, each a well-formed record.

An FFN expert is a sum over its intermediate rows, out = sum_i w2[:, i] * act(gate_i . x, up_i . x),
so it equals the sum of q experts, slice j holding the rows [j I/q, (j+1) I/q): their gate and up
rows (w13) and their columns of w2. Every slice has the same layout (intermediate I/q), so every
kernel computes a slice as it computes a record; the hybrid decode (runtime/cpu_layers.py)
gives the CPU and the GPU shares of one expert in proportion to their speeds this way.

Our own formats (quant.py: q8/q4/q2 in groups of 64 columns, raw f32/f16/bf16) slice at group
boundaries; llama.cpp's block formats and experts with biases (the down bias belongs to no slice)
are not sliced (q = 1).
"""
from __future__ import annotations

import torch

from .. import quant
from .layout import RecordLayout

SMALLEST = 512  # intermediate rows of the smallest slice: smaller ones leave the kernels' threads short of work


def slice_count(layout: RecordLayout, k: int, want: int = 16, smallest: int | None = None) -> int:
    """Slices per expert for a token of k experts: the fewest that cut the token's work into at
    least `want` pieces (a share of the token's bytes to 1/want), each of at least `smallest`
    (SMALLEST) intermediate rows and a whole number of groups; 1 where the layout cannot be sliced.
    16: on the H200 the CPU has room for about an eighth of an expert beside the copy (Mixtral, k = 2)."""
    smallest = SMALLEST if smallest is None else smallest
    if {p.name for p in layout.parts} != {"w13", "w2"} or \
            any(p.format not in quant.FORMATS for p in layout.parts):
        return 1
    groups = layout.intermediate // quant.GROUP if layout.intermediate % quant.GROUP == 0 else 0
    fits = [q for q in range(2, groups + 1) if groups % q == 0 and layout.intermediate // q >= smallest]
    return next((q for q in fits if q * k >= want), fits[-1] if fits else 1)


def slice_layout(layout: RecordLayout, q: int) -> RecordLayout:
    """The layout of one of q slices (intermediate I/q, the record's formats)."""
    if q == 1:
        return layout
    return RecordLayout.build(layout.part("w13").format, layout.hidden, layout.intermediate // q,
                              w2_format=layout.part("w2").format)


def cut(src: torch.Tensor, layout: RecordLayout, q: int, dst: torch.Tensor) -> None:
    """Write the q slices of record `src` (uint8) into dst, slice j at j * slice_layout(...).size
    (dst must not overlap src)."""
    sub = slice_layout(layout, q)
    I, i = layout.intermediate, layout.intermediate // q
    if dst.numel() < q * sub.size:
        raise ValueError(f"cut: {q} slices need {q * sub.size} bytes, the destination has {dst.numel()}")
    for name in ("w13", "w2"):
        p, sp = layout.part(name), sub.part(name)
        whole = quant.views(layout.part_bytes(src, name), p.format, p.shape)
        for j in range(q):
            piece = quant.views(sub.part_bytes(dst[j * sub.size:(j + 1) * sub.size], name), sp.format, sp.shape)
            for sec, t in whole.items():
                if name == "w13":  # rows: gate rows of the slice, then its up rows
                    piece[sec][:i].copy_(t[j * i:(j + 1) * i])
                    piece[sec][i:].copy_(t[I + j * i:I + (j + 1) * i])
                else:  # columns (codes, scales and biases alike: every section is [H, a multiple of q])
                    c = t.shape[1] // q
                    piece[sec].copy_(t[:, j * c:(j + 1) * c])
