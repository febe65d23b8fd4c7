# distutils: sources = csrc/cuda/fm_decode.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_decode.h csrc/cuda/fm_cuda.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._decode_cuda: fused decode kernels (csrc/cuda/fm_decode.cu, see fm_decode.h).

Built only where nvcc is found; links the CUDA toolkit's runtime, never libtorch. Tensors are
passed by data_ptr() after the checks below (device, dtype, size, contiguity), so the kernels
never read out of bounds; every call is asynchronous on the current torch stream of its device.

    add_norm(h, delta, h_out, w, x_out, eps)
    attention(qkv, q_norm, k_norm, qk_norm, clip, inv_freq, pos, K, V, out, partial, counters,
              heads, kv_heads, head_dim, window, splits, eps, scale)
    route(h, o, h_out, x_out, norm_w, router_w, logits, counter, ids, weights, entries, base, addrs,
          stride, top_k, norm_topk, eps)
    workspace_floats(kv_heads, heads, head_dim, splits), default_splits(kv_heads, n_ctx, device)
    pdl(value=None) -> previous        (programmatic dependent launch on sm_90+, on by default)
"""
from libc.stdint cimport int64_t, uintptr_t

import torch as _torch

cdef extern from "fm_decode.h" nogil:
    ctypedef struct fmd_attn:
        const void *qkv
        const void *q_norm
        const void *k_norm
        const float *inv_freq
        const int64_t *pos
        void *K
        void *V
        void *out
        float *partial
        int *counters
        int dtype, heads, kv_heads, head_dim, n_ctx, window, qk_norm, has_clip, splits
        float eps, scale, clip
    ctypedef struct fmd_route_args:
        const void *h
        const void *o
        void *h_out
        void *x_out
        const void *norm_w
        const void *router_w
        float *logits
        int *counter
        int64_t *ids
        void *weights
        const int64_t *entries
        const int64_t *base
        int64_t *addrs
        int64_t stride
        int dtype, n, experts, top_k, norm_topk
        float eps
    int fmd_add_norm(int dtype, const void *h, const void *delta, void *h_out, const void *w, void *x_out, int n,
                     float eps, int device, void *stream)
    int fmd_attention(const fmd_attn *a, int device, void *stream)
    int fmd_route(const fmd_route_args *r, int device, void *stream)
    size_t fmd_attention_workspace(int kv_heads, int heads, int head_dim, int splits)
    int fmd_default_splits(int kv_heads, int n_ctx, int device)
    int fmd_pdl(int value)
    const char *fmd_strerror(int code)

_DTYPES = {_torch.float32: 0, _torch.float16: 1, _torch.bfloat16: 2}


class CudaKernelError(RuntimeError):
    """A CUDA launch failed (the message carries the CUDA error)."""


cdef int _check(int rc, what) except -1:
    if rc == 0:
        return 0
    msg = fmd_strerror(rc).decode()
    if rc > 0:
        raise CudaKernelError(f"{what}: CUDA error {rc}: {msg}")
    raise ValueError(f"{what}: {msg}")


cdef uintptr_t _ptr(t, name, int device, dtype, int64_t numel) except? 0:
    """data_ptr of a contiguous CUDA tensor on `device` with `dtype` and at least `numel` values
    (a None tensor gives 0 when numel is 0)."""
    if t is None:
        if numel == 0:
            return 0
        raise ValueError(f"{name} is required")
    if not isinstance(t, _torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda or (t.device.index if t.device.index is not None else _torch.cuda.current_device()) != device:
        raise ValueError(f"{name} must be on cuda:{device}, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() < numel:
        raise ValueError(f"{name} holds {t.numel()} values, needs {numel}")
    return t.data_ptr()


cdef tuple _dev_dtype(t, name):
    if not isinstance(t, _torch.Tensor) or not t.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return (t.device.index if t.device.index is not None else _torch.cuda.current_device()), t.dtype


cdef uintptr_t _stream(int device):
    return _torch.cuda.current_stream(device).cuda_stream


def pdl(value=None):
    return fmd_pdl(-1 if value is None else int(bool(value)))


def workspace_floats(int kv_heads, int heads, int head_dim, int splits):
    return fmd_attention_workspace(kv_heads, heads, head_dim, splits)


def default_splits(int kv_heads, int n_ctx, int device):
    return fmd_default_splits(kv_heads, n_ctx, device)


def add_norm(h, delta, h_out, w, x_out, float eps):
    """h_out = h + delta; x_out = rms_norm(h_out) * w (one row of n values)."""
    dev, dt = _dev_dtype(h, "h")
    cdef int64_t n = h.numel()
    cdef uintptr_t ph = _ptr(h, "h", dev, dt, n), pd = _ptr(delta, "delta", dev, dt, n)
    cdef uintptr_t po = _ptr(h_out, "h_out", dev, dt, n), pw = _ptr(w, "w", dev, dt, n)
    cdef uintptr_t px = _ptr(x_out, "x_out", dev, dt, n), sp = _stream(dev)
    cdef int code = _DTYPES[dt], d = dev, rc
    with nogil:
        rc = fmd_add_norm(code, <const void *>ph, <const void *>pd, <void *>po, <const void *>pw, <void *>px,
                          <int>n, eps, d, <void *>sp)
    _check(rc, "add_norm")


def attention(qkv, q_norm, k_norm, int qk_norm, clip, inv_freq, pos, K, V, out, partial, counters,
              int heads, int kv_heads, int head_dim, int window, int splits, float eps, float scale):
    """One token's attention (see fm_decode.h); qk_norm 0 none, 1 per head, 2 over all heads."""
    dev, dt = _dev_dtype(qkv, "qkv")
    if kv_heads <= 0 or heads % kv_heads or head_dim % 2 or not 0 < head_dim <= 256 or splits < 1:
        raise ValueError(f"attention: unsupported heads {heads}/{kv_heads} x head_dim {head_dim}, splits {splits}")
    cdef int64_t nq = heads * head_dim, nk = kv_heads * head_dim
    if K.dim() != 3 or tuple(K.shape[1:]) != (kv_heads, head_dim) or tuple(V.shape) != tuple(K.shape):
        raise ValueError(f"K/V must have shape [n_ctx, {kv_heads}, {head_dim}], got {tuple(K.shape)}, {tuple(V.shape)}")
    cdef fmd_attn a
    cdef int64_t nn = 0 if qk_norm == 0 else (head_dim if qk_norm == 1 else nq)
    cdef int64_t kn = 0 if qk_norm == 0 else (head_dim if qk_norm == 1 else nk)
    a.qkv = <const void *>_ptr(qkv, "qkv", dev, dt, nq + 2 * nk)
    a.q_norm = <const void *>_ptr(q_norm, "q_norm", dev, dt, nn)
    a.k_norm = <const void *>_ptr(k_norm, "k_norm", dev, dt, kn)
    a.inv_freq = <const float *>_ptr(inv_freq, "inv_freq", dev, _torch.float32, head_dim // 2)
    a.pos = <const int64_t *>_ptr(pos, "pos", dev, _torch.int64, 1)
    a.K = <void *>_ptr(K, "K", dev, dt, K.numel())
    a.V = <void *>_ptr(V, "V", dev, dt, K.numel())
    a.out = <void *>_ptr(out, "out", dev, dt, nq)
    a.partial = <float *>_ptr(partial, "partial", dev, _torch.float32,
                              fmd_attention_workspace(kv_heads, heads, head_dim, splits))
    a.counters = <int *>_ptr(counters, "counters", dev, _torch.int32, kv_heads)
    a.dtype, a.heads, a.kv_heads, a.head_dim, a.n_ctx = _DTYPES[dt], heads, kv_heads, head_dim, K.shape[0]
    a.window, a.qk_norm, a.splits, a.eps, a.scale = window, qk_norm, splits, eps, scale
    a.has_clip, a.clip = (0, 0.0) if clip is None else (1, float(clip))
    cdef uintptr_t sp = _stream(dev)
    cdef int d = dev, rc
    with nogil:
        rc = fmd_attention(&a, d, <void *>sp)
    _check(rc, "attention")


def route(h, o, h_out, x_out, norm_w, router_w, logits, counter, ids, weights, entries, base, addrs,
          int64_t stride, int top_k, bint norm_topk, float eps):
    """h_out = h + o; x_out = rms_norm(h_out) * norm_w; the router, softmax, top-k, ids, weights and
    record addresses base + entries[id] * stride (see fm_decode.h)."""
    dev, dt = _dev_dtype(h, "h")
    cdef int64_t n = h.numel()
    if router_w.dim() != 2 or router_w.shape[1] != n:
        raise ValueError(f"router_w must have shape [experts, {n}], got {tuple(router_w.shape)}")
    cdef int64_t E = router_w.shape[0]
    cdef fmd_route_args r
    r.h = <const void *>_ptr(h, "h", dev, dt, n)
    r.o = <const void *>_ptr(o, "o", dev, dt, n)
    r.h_out = <void *>_ptr(h_out, "h_out", dev, dt, n)
    r.x_out = <void *>_ptr(x_out, "x_out", dev, dt, n)
    r.norm_w = <const void *>_ptr(norm_w, "norm_w", dev, dt, n)
    r.router_w = <const void *>_ptr(router_w, "router_w", dev, dt, E * n)
    r.logits = <float *>_ptr(logits, "logits", dev, _torch.float32, E)
    r.counter = <int *>_ptr(counter, "counter", dev, _torch.int32, 1)
    r.ids = <int64_t *>_ptr(ids, "ids", dev, _torch.int64, top_k)
    r.weights = <void *>_ptr(weights, "weights", dev, dt, top_k)
    r.entries = <const int64_t *>_ptr(entries, "entries", dev, _torch.int64, E)
    r.base = <const int64_t *>_ptr(base, "base", dev, _torch.int64, 1)
    r.addrs = <int64_t *>_ptr(addrs, "addrs", dev, _torch.int64, top_k)
    r.stride, r.dtype, r.n, r.experts, r.top_k, r.norm_topk, r.eps = stride, _DTYPES[dt], n, E, top_k, norm_topk, eps
    cdef uintptr_t sp = _stream(dev)
    cdef int d = dev, rc
    with nogil:
        rc = fmd_route(&r, d, <void *>sp)
    _check(rc, "route")
