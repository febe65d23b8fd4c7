# distutils: sources = csrc/cuda/fm_attn.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_attn.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._attn_cuda: one decode token's attention block in one launch
(csrc/cuda/fm_attn.cu): RoPE of q and k, the K/V cache writes at the position (read from device
memory: a captured graph replays it at every position), GQA flash-decoding over positions 0..pos.
Built only where nvcc is found. Checked here: dtypes, devices, shapes, contiguity, alignment.

    HEAD_DIMS                                (16, 32, 64, 128, 256)
    workspace_bytes(heads, kv_heads, head_dim, n_ctx, device) -> int
    decode_attention(q, k, v, cos, sin, K, V, pos, window, scale, out, workspace, stream=None)
        q [.., heads*D], k, v [.., kv_heads*D], cos, sin [.., D], out [.., heads*D]: one dtype
        (float32/float16/bfloat16); K, V [n_ctx, kv_heads, D]; pos: int64 CUDA tensor [1];
        workspace: uint8 CUDA tensor of workspace_bytes(...), zeroed once, one stream at a time
    tune(key, value=None) -> int             knobs "splits", "pdl", "min_chunk", "cluster_ctx"; "last_splits",
                                             "last_grid", "last_cluster"
"""
from libc.stdint cimport int64_t, uintptr_t

import torch as _torch

cdef extern from "fm_attn.h" nogil:
    const char *fmc_attn_strerror(int code)
    size_t fmc_attn_workspace_bytes(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx, int device)
    int fmc_decode_attention(int dtype, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx,
                             const void *q, const void *k, const void *v, const void *cos, const void *sin,
                             void *K, void *V, const int64_t *pos, int64_t window, float scale, void *out,
                             void *workspace, size_t workspace_bytes, int device, void *stream)
    int64_t fmc_attn_tune(int key, int64_t value)

HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = {_torch.float32: 0, _torch.float16: 1, _torch.bfloat16: 2}
_TUNE = {"splits": 0, "pdl": 1, "min_chunk": 2, "last_splits": 3, "last_grid": 4, "cluster_ctx": 5,
         "last_cluster": 6}


def tune(key, value=None):
    """Set a knob (value >= 0) and return its previous value; read-only keys: the last launch's."""
    if key not in _TUNE:
        raise ValueError(f"unknown knob {key!r}; known: {', '.join(_TUNE)}")
    return fmc_attn_tune(_TUNE[key], -1 if value is None else int(value))


def workspace_bytes(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx, int device):
    cdef size_t n = fmc_attn_workspace_bytes(heads, kv_heads, head_dim, n_ctx, device)
    if n == 0:
        raise ValueError(f"decode_attention: no kernel for heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}, "
                         f"n_ctx={n_ctx} (head_dim one of {HEAD_DIMS}, heads a multiple of kv_heads)")
    return n


def _check(t, name, dtype, dev, numel=None):
    if not isinstance(t, _torch.Tensor) or not t.is_cuda:
        raise ValueError(f"decode_attention: {name} must be a CUDA tensor")
    if t.dtype != dtype:
        raise TypeError(f"decode_attention: {name} is {t.dtype}, expected {dtype}")
    if dev is not None and t.device != dev:
        raise ValueError(f"decode_attention: {name} is on {t.device}, not {dev}")
    if not t.is_contiguous():
        raise ValueError(f"decode_attention: {name} must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"decode_attention: {name} has {t.numel()} values, expected {numel}")


def decode_attention(q, k, v, cos, sin, K, V, pos, int64_t window, float scale, out, workspace, stream=None):
    """out = attention of this token's q over K/V positions 0..pos, after writing the rotated k and
    v at pos (everything on `stream`, asynchronous)."""
    if not isinstance(K, _torch.Tensor) or K.dim() != 3:
        raise ValueError("decode_attention: K must be a tensor [n_ctx, kv_heads, head_dim]")
    dt = K.dtype
    if dt not in _DTYPES:
        raise TypeError(f"decode_attention: the cache dtype must be float32, float16 or bfloat16, not {dt}")
    n_ctx, kvh, D = K.shape
    dev = K.device
    _check(K, "K", dt, None)
    if tuple(V.shape) != tuple(K.shape):
        raise ValueError(f"decode_attention: V is {tuple(V.shape)}, K {tuple(K.shape)}")
    _check(V, "V", dt, dev)
    if q.numel() % D or q.numel() // D % kvh:
        raise ValueError(f"decode_attention: q has {q.numel()} values, not a multiple of kv_heads*head_dim = {kvh * D}")
    heads = q.numel() // D
    _check(q, "q", dt, dev)
    _check(k, "k", dt, dev, kvh * D)
    _check(v, "v", dt, dev, kvh * D)
    _check(cos, "cos", dt, dev, D)
    _check(sin, "sin", dt, dev, D)
    _check(out, "out", dt, dev, heads * D)
    _check(pos, "pos", _torch.int64, dev, 1)
    cdef int d = dev.index if dev.index is not None else _torch.cuda.current_device()
    _check(workspace, "workspace", _torch.uint8, dev)
    cdef size_t need = workspace_bytes(heads, kvh, D, n_ctx, d)
    if workspace.numel() < need:
        raise ValueError(f"decode_attention: workspace holds {workspace.numel()} bytes, needs {need}")
    cdef uintptr_t qp = q.data_ptr(), kp = k.data_ptr(), vp = v.data_ptr(), cp = cos.data_ptr(), sp = sin.data_ptr()
    cdef uintptr_t Kp = K.data_ptr(), Vp = V.data_ptr(), pp = pos.data_ptr(), op = out.data_ptr()
    cdef uintptr_t wp = workspace.data_ptr()
    cdef uintptr_t st = _torch.cuda.current_stream(dev).cuda_stream if stream is None else int(stream)
    cdef size_t wn = workspace.numel()
    cdef int dtc = _DTYPES[dt], rc
    cdef int64_t H = heads, KVH = kvh, HD = D, N = n_ctx
    with nogil:
        rc = fmc_decode_attention(dtc, H, KVH, HD, N, <const void *>qp, <const void *>kp, <const void *>vp,
                                  <const void *>cp, <const void *>sp, <void *>Kp, <void *>Vp,
                                  <const int64_t *>pp, window, scale, <void *>op, <void *>wp, wn, d, <void *>st)
    if rc > 0:
        raise RuntimeError(f"decode_attention: CUDA error {rc}: {fmc_attn_strerror(rc).decode()}")
    if rc < 0:
        raise ValueError(f"decode_attention: {fmc_attn_strerror(rc).decode()}")
    return out
