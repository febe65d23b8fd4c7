# distutils: sources = csrc/cpu/fm_quant.c
# distutils: include_dirs = csrc/cpu
# distutils: libraries = m
# cython: language_level=3
"""flashmoe_plugin._quant: the converter's quantizer in C (csrc/cpu/fm_quant.c), same algorithm
as quant.py. quantize_rows(w, bits, q, scales, biases) fills the sections of one part;
quantize_q8_absmax_rows(w, q, scales) the one-pass q8 of the dense part at load."""
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uintptr_t

import torch as _torch

cdef extern from "fm_quant.h" nogil:
    int fmq_quantize(const float *w, int64_t rows, int64_t cols, int bits,
                     uint8_t *q, uint16_t *scales, uint16_t *biases)
    int fmq_quantize_q8_absmax(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *q, uint16_t *scales)


cdef uintptr_t _ptr(t, str name, dtype, tuple shape) except 0:
    if not isinstance(t, _torch.Tensor) or t.device.type != "cpu" or t.dtype != dtype:
        raise ValueError(f"{name}: expected a CPU {dtype} tensor")
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape {shape}, got {tuple(t.shape)}")
    return <uintptr_t>t.data_ptr() if t.numel() else 1


def quantize_rows(w, int bits, q, scales, biases=None):
    """w: float32 [rows, cols]; writes codes, fp16 scales (and biases for 4/2 bits); GIL released."""
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, not {bits}")
    if w.dim() != 2 or w.shape[1] % 64:
        raise ValueError(f"w: expected [rows, cols] with cols a multiple of 64, got {tuple(w.shape)}")
    cdef int64_t rows = w.shape[0], cols = w.shape[1]
    cdef uintptr_t pw = _ptr(w, "w", _torch.float32, (rows, cols))
    cdef uintptr_t pq = _ptr(q, "q", _torch.int8 if bits == 8 else _torch.uint8, (rows, cols * bits // 8))
    cdef uintptr_t ps = _ptr(scales, "scales", _torch.float16, (rows, cols // 64))
    cdef uintptr_t pb = 0
    if bits != 8:
        pb = _ptr(biases, "biases", _torch.float16, (rows, cols // 64))
    cdef int rc
    with nogil:
        rc = fmq_quantize(<const float *>pw, rows, cols, bits, <uint8_t *>pq, <uint16_t *>ps, <uint16_t *>pb)
    if rc:
        raise ValueError("fmq_quantize rejected its arguments")


def quantize_q8_absmax_rows(w, q, scales):
    """q8 with the plain absmax scale per group (quant.quantize_q8_absmax): w float32 or bfloat16
    [rows, cols] (bf16 read as it is, no float32 copy); GIL released."""
    if w.dim() != 2 or w.shape[1] % 64:
        raise ValueError(f"w: expected [rows, cols] with cols a multiple of 64, got {tuple(w.shape)}")
    cdef int64_t rows = w.shape[0], cols = w.shape[1]
    cdef int bf16 = w.dtype == _torch.bfloat16
    cdef uintptr_t pw = _ptr(w, "w", _torch.bfloat16 if bf16 else _torch.float32, (rows, cols))
    cdef uintptr_t pq = _ptr(q, "q", _torch.int8, (rows, cols))
    cdef uintptr_t ps = _ptr(scales, "scales", _torch.float16, (rows, cols // 64))
    cdef int rc
    with nogil:
        rc = fmq_quantize_q8_absmax(<const void *>pw, bf16, rows, cols, <int8_t *>pq, <uint16_t *>ps)
    if rc:
        raise ValueError("fmq_quantize_q8_absmax rejected its arguments")
