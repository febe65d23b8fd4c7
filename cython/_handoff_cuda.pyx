# distutils: sources = csrc/cuda/fm_handoff.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_handoff.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._handoff_cuda: the device side of a decode token's n_cpu_moe layers handed to
the host inside one captured graph (csrc/cuda/fm_handoff.cu; the host side is _cpu_kernels'
HybridPlan). Built only where nvcc is found; links cudart, never libtorch.

    mapped(t) -> int     the device address of a pinned host tensor's memory (0: not mapped)
    handoff(pack, host_pack, ready, done, seq, host_out, delta, err, timeout_cycles, stream=None)
        one CPU layer: pack (fp32 CUDA [n]) -> host_pack (mapped), ready = ++seq, wait for
        done == seq, host_out (mapped fp32 [H]) -> delta (CUDA [1, H] or [H], fp32/f16/bf16).
        host_pack, ready, done, host_out and err are device addresses (mapped()); seq is an int32
        CUDA tensor of one element. Asynchronous on `stream` (None: torch's current stream).
"""
from libc.stdint cimport uintptr_t

import torch as _torch

cdef extern from "fm_handoff.h" nogil:
    int fmc_handoff(const float *pack, int n, float *host_pack, unsigned *ready, const unsigned *done,
                    unsigned *seq, const float *host_out, void *delta, int dtype, int H,
                    long long timeout_cycles, int *err, void *stream)
    uintptr_t fmc_mapped(void *host)
    const char *fmc_handoff_error(int code)

_DTYPES = {_torch.float32: 0, _torch.float16: 1, _torch.bfloat16: 2}


def mapped(t):
    """The device address of pinned host tensor t's data (0 where the runtime maps none)."""
    if not isinstance(t, _torch.Tensor) or t.is_cuda or not t.is_pinned():
        raise ValueError("mapped: expected a pinned CPU tensor")
    return fmc_mapped(<void *><uintptr_t>t.data_ptr())


def handoff(pack, uintptr_t host_pack, uintptr_t ready, uintptr_t done, seq, uintptr_t host_out, delta,
            uintptr_t err, long long timeout_cycles, stream=None):
    for name, t in (("pack", pack), ("seq", seq), ("delta", delta)):
        if not isinstance(t, _torch.Tensor) or not t.is_cuda or not t.is_contiguous():
            raise ValueError(f"handoff: {name} must be a contiguous CUDA tensor")
    if pack.dtype != _torch.float32 or seq.dtype != _torch.int32 or seq.numel() != 1:
        raise ValueError("handoff: pack must be float32 and seq one int32")
    if delta.dtype not in _DTYPES:
        raise ValueError(f"handoff: delta must be float32, float16 or bfloat16, got {delta.dtype}")
    if not (host_pack and ready and done and host_out and err):
        raise ValueError("handoff: a host address is 0 (not mapped)")
    cdef int n = pack.numel(), H = delta.numel(), dt = _DTYPES[delta.dtype]
    cdef uintptr_t sp = (_torch.cuda.current_stream(pack.device).cuda_stream if stream is None else stream)
    cdef uintptr_t pp = pack.data_ptr(), qp = seq.data_ptr(), dp = delta.data_ptr()
    cdef int rc
    with nogil:
        rc = fmc_handoff(<const float *>pp, n, <float *>host_pack, <unsigned *>ready, <const unsigned *>done,
                         <unsigned *>qp, <const float *>host_out, <void *>dp, dt, H, timeout_cycles, <int *>err,
                         <void *>sp)
    if rc != 0:
        raise RuntimeError(f"handoff: CUDA error {rc}: {fmc_handoff_error(rc).decode()}")
