# distutils: sources = csrc/cuda/fm_gguf.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_gguf_cuda.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._gguf_kernels_cuda: llama.cpp's block formats on NVIDIA GPUs
(csrc/cuda/fm_gguf.cu), the twin of _gguf_kernels. Built only where nvcc is found.

    device_count() -> int
    dequantize(part, fmt, shape, out=None, stream=None) -> float32 CUDA [rows, cols]
        part: a uint8 CUDA tensor holding the rows (bit-exact vs gguf-py's dequantize)
"""
from libc.stdint cimport int64_t, uintptr_t

import torch as _torch

cdef extern from "fm_gguf_cuda.h" nogil:
    int64_t fmg_cuda_row_bytes(int type, int64_t cols)
    int fmg_cuda_dequant(int type, const void *src, int64_t rows, int64_t cols, float *out, int device, void *stream)
    int fmg_cuda_device_count()

TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12,
         "q5_k": 13, "q6_k": 14, "mxfp4": 39}


def device_count():
    return fmg_cuda_device_count()


def dequantize(part, fmt, shape, out=None, stream=None):
    if fmt not in TYPES:
        raise ValueError(f"unknown GGUF block format {fmt!r}; supported: {', '.join(TYPES)}")
    cdef int t = TYPES[fmt]
    cdef int64_t rows = int(shape[0]), cols = int(shape[1])
    cdef int64_t rb = fmg_cuda_row_bytes(t, cols)
    if rb < 0 or rows <= 0:
        raise ValueError(f"dequantize: shape {tuple(shape)} is not whole {fmt} blocks")
    if not isinstance(part, _torch.Tensor) or part.dtype != _torch.uint8 or not part.is_cuda or not part.is_contiguous():
        raise ValueError("dequantize: part must be a contiguous uint8 CUDA tensor")
    if part.numel() < rows * rb:
        raise ValueError(f"dequantize: part holds {part.numel()} bytes, needs {rows * rb}")
    if out is None:
        out = _torch.empty((rows, cols), dtype=_torch.float32, device=part.device)
    if out.dtype != _torch.float32 or out.device != part.device or not out.is_contiguous() or tuple(out.shape) != (rows, cols):
        raise ValueError(f"dequantize: out must be a contiguous float32 [{rows}, {cols}] tensor on {part.device}")
    cdef uintptr_t sp = _torch.cuda.current_stream(part.device).cuda_stream if stream is None else int(stream)
    cdef uintptr_t pp = part.data_ptr(), op = out.data_ptr()
    cdef int dev = part.device.index if part.device.index is not None else _torch.cuda.current_device()
    cdef int rc
    with nogil:
        rc = fmg_cuda_dequant(t, <const void *>pp, rows, cols, <float *>op, dev, <void *>sp)
    if rc != 0:
        raise RuntimeError(f"dequantize ({fmt}): CUDA kernel launch failed ({rc})")
    return out
