"""The converter's quantizer: the C implementation (flashmoe_plugin._quant, rows split across
threads with the GIL released) where it is built, else the torch reference in quant.py."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import quant as Q

try:
    from .._quant import quantize_rows as _native
except ImportError:  # not built: the reference is correct, only slower
    _native = None

_pool = None


def quantize(w: torch.Tensor, fmt: str, threads: int | None = None) -> torch.Tensor:
    """Pack a float weight [out, in] into one part, as quant.quantize."""
    if _native is None or fmt not in Q.QUANT_BITS:
        return Q.quantize(w, fmt)
    global _pool
    out, inp = Q.check_shape(fmt, w.shape)
    w = w.to(torch.float32).contiguous()
    buf = torch.zeros(Q.part_nbytes(fmt, (out, inp)), dtype=torch.uint8)
    v = Q.views(buf, fmt, (out, inp))
    bits = Q.QUANT_BITS[fmt]
    n = max(1, threads or os.cpu_count() or 1)
    step = max(1, -(-out // (4 * n)))
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="flashmoe-quant")

    def rows(r):
        _native(w[r:r + step], bits, v["q"][r:r + step], v["scales"][r:r + step],
                v["biases"][r:r + step] if bits != 8 else None)
    list(_pool.map(rows, range(0, out, step)))
    return buf
