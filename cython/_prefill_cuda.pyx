# distutils: sources = csrc/cuda/fm_prefill.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_prefill.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._prefill_cuda: prefill on tensor cores (csrc/cuda/fm_prefill.cu), a grouped
mixed-input GEMM over q4/q8 parts, all of a layer's experts in one launch. Built only where nvcc
is found. Checked here: dtypes, devices, shapes, contiguity, alignment.

    FORMATS                                  {"q8": 3, "q4": 4}
    device_count() -> int
    grouped_gemm(fmt, parts, part_off, sections, N, K, offsets, max_count, x, y, swiglu=False,
                 variant="auto", stream=None)
        parts: int64 CUDA tensor [E] of record addresses, part at address + part_off
        sections: (scales offset, biases offset or 0) inside the part (quant.sections)
        offsets: int32 CUDA tensor [E+1] of token offsets (tokens sorted by expert)
        x: bf16 [offsets[E], K]; y: bf16 [offsets[E], N], or [offsets[E], N // 2] with swiglu
           (W = gate rows then up rows: y = silu(x Wg.T) * (x Wu.T))
"""
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t

import torch as _torch

cdef extern from "fm_prefill.h" nogil:
    int fmp_grouped_gemm(int fmt, const uint64_t *parts, int64_t part_off, int64_t s_off, int64_t b_off,
                         int64_t N, int64_t K, int swiglu, int variant, const int32_t *offsets, int E,
                         int64_t max_count, const void *x, void *y, int device, void *stream)
    int fmp_device_count()

FORMATS = {"q8": 3, "q4": 4}
VARIANTS = {"auto": 0, "dequant": 1}
"""auto: q4 multiplies its integer codes and scales the sums (x's every 8 elements in the order
0,4,1,5,2,6,3,7, the SwiGLU output written so), q8 dequantizes; dequant: every weight dequantized
to bf16 in registers (q4 too; for comparisons)."""
TILE_ROWS = 256
"""Weight rows per block; with swiglu the intermediate size must be a multiple of half of it."""


def device_count():
    return fmp_device_count()


def _cuda(t, name, dtype, dev):
    if not isinstance(t, _torch.Tensor) or t.dtype != dtype or not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"grouped_gemm: {name} must be a contiguous {dtype} CUDA tensor")
    if dev is not None and t.device != dev:
        raise ValueError(f"grouped_gemm: {name} is on {t.device}, not {dev}")


def grouped_gemm(fmt, parts, int64_t part_off, sections, int64_t N, int64_t K, offsets, int64_t max_count,
                 x, y, swiglu=False, variant="auto", stream=None):
    if fmt not in FORMATS:
        raise ValueError(f"grouped_gemm: format {fmt!r} not supported; supported: {', '.join(FORMATS)}")
    if variant not in VARIANTS:
        raise ValueError(f"grouped_gemm: variant {variant!r} unknown; known: {', '.join(VARIANTS)}")
    _cuda(x, "x", _torch.bfloat16, None)
    dev = x.device
    _cuda(y, "y", _torch.bfloat16, dev)
    _cuda(parts, "parts", _torch.int64, dev)
    _cuda(offsets, "offsets", _torch.int32, dev)
    cdef int E = parts.numel()
    if offsets.numel() != E + 1:
        raise ValueError(f"grouped_gemm: offsets has {offsets.numel()} entries, needs E+1 = {E + 1}")
    if K % 64 or N % 64:
        raise ValueError(f"grouped_gemm: N={N} and K={K} must be multiples of 64")
    if swiglu and (N // 2) % (TILE_ROWS // 2):
        raise ValueError(f"grouped_gemm: swiglu needs N/2 = {N // 2} to be a multiple of {TILE_ROWS // 2}")
    T = x.shape[0]
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"grouped_gemm: x must be [tokens, {K}], got {tuple(x.shape)}")
    ny = N // 2 if swiglu else N
    if tuple(y.shape) != (T, ny):
        raise ValueError(f"grouped_gemm: y must be [{T}, {ny}], got {tuple(y.shape)}")
    if x.data_ptr() % 16 or y.data_ptr() % 16:
        raise ValueError("grouped_gemm: x and y must start on a 16-byte boundary")
    s_off, b_off = int(sections[0]), int(sections[1] or 0)
    cdef int f = FORMATS[fmt], sw = 1 if swiglu else 0, var = VARIANTS[variant]
    cdef int d = dev.index if dev.index is not None else _torch.cuda.current_device()
    cdef uintptr_t sp = _torch.cuda.current_stream(dev).cuda_stream if stream is None else int(stream)
    cdef uintptr_t pp = parts.data_ptr(), op = offsets.data_ptr(), xp = x.data_ptr(), yp = y.data_ptr()
    cdef int64_t so = s_off, bo = b_off
    cdef int rc
    with nogil:
        rc = fmp_grouped_gemm(f, <const uint64_t *>pp, part_off, so, bo, N, K, sw, var, <const int32_t *>op, E,
                              max_count, <const void *>xp, <void *>yp, d, <void *>sp)
    if rc == -1:
        raise ValueError(f"grouped_gemm: bad arguments (fmt {fmt}, N {N}, K {K}, part_off {part_off}, variant {variant}, "
                         f"sections {tuple(sections)}, max_count {max_count})")
    if rc == -2:
        raise ValueError("grouped_gemm: the device has too little shared memory per block")
    if rc != 0:
        raise RuntimeError(f"grouped_gemm: CUDA error {rc}")
    return y
