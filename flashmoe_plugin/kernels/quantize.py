"""The converter's quantizer: the C implementation (flashmoe_plugin._quant, rows split across
threads with the GIL released) where it is built, else the torch reference in quant.py."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import quant as Q

try:
    from .._quant import quantize_rows as _native
    from .._quant import quantize_q8_absmax_rows as _native_absmax
except ImportError:  # not built: the reference is correct, only slower
    _native = _native_absmax = None

_pool = None


def quantize(w: torch.Tensor, fmt: str, threads: int | None = None, fit: str = "search") -> torch.Tensor:
    """Pack a float weight [out, in] into one part, as quant.quantize; fit="absmax" (q8 only):
    as quant.quantize_q8_absmax, one pass (a bf16 w is read as it is)."""
    if fit == "absmax":
        if fmt != "q8":
            raise ValueError(f"fit='absmax' is a q8 quantizer, not {fmt}")
        return _absmax(w, threads)
    if _native is None or fmt not in Q.QUANT_BITS:
        return Q.quantize(w, fmt)
    out, inp = Q.check_shape(fmt, w.shape)
    w = w.to(torch.float32).contiguous()
    buf = torch.zeros(Q.part_nbytes(fmt, (out, inp)), dtype=torch.uint8)
    v = Q.views(buf, fmt, (out, inp))
    bits = Q.QUANT_BITS[fmt]

    def rows(r, step):
        _native(w[r:r + step], bits, v["q"][r:r + step], v["scales"][r:r + step],
                v["biases"][r:r + step] if bits != 8 else None)
    _split(out, threads, rows)
    return buf


def _absmax(w: torch.Tensor, threads: int | None) -> torch.Tensor:
    out, inp = Q.check_shape("q8", w.shape)
    if _native_absmax is None:
        return Q.quantize_q8_absmax(w)
    if w.dtype not in (torch.float32, torch.bfloat16):
        w = w.to(torch.float32)
    w = w.contiguous()
    buf = torch.zeros(Q.part_nbytes("q8", (out, inp)), dtype=torch.uint8)
    v = Q.views(buf, "q8", (out, inp))

    def rows(r, step):
        _native_absmax(w[r:r + step], v["q"][r:r + step], v["scales"][r:r + step])
    _split(out, threads, rows)
    return buf


def _split(out: int, threads: int | None, fn):
    """fn(first_row, n_rows) over [0, out) in chunks, on the module's thread pool (GIL released)."""
    global _pool
    n = max(1, threads or os.cpu_count() or 1)
    step = max(1, -(-out // (4 * n)))
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="flashmoe-quant")
    list(_pool.map(lambda r: fn(r, step), range(0, out, step)))
