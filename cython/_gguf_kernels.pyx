# distutils: sources = csrc/cpu/fm_gguf.c csrc/cpu/fm_gguf_q8.c csrc/cpu/fm_ggml_f32.c
# distutils: include_dirs = csrc/cpu
# distutils: depends = csrc/cpu/fm_gguf.h csrc/cpu/fm_gguf_q8.h csrc/cpu/fm_ggml_f32.h csrc/cpu/fm_kernels_internal.h
# distutils: libraries = m
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._gguf_kernels: llama.cpp's block formats on the CPU (csrc/cpu/fm_gguf.c).

Formats by name (quant_gguf.py): f32 f16 bf16 q4_0 q4_1 q5_0 q5_1 q8_0 q4_k q5_k q6_k mxfp4. Tensors are checked
here (dtype, device, contiguity, byte lengths) so that the C code never reads out of bounds.

    row_bytes(fmt, cols) -> int
    dequantize(part, fmt, shape, offset=0) -> float32 [rows, cols]   (bit-exact vs gguf-py)
    linear(x, part, fmt, shape, offset=0, act="q8") -> [T, rows]     x [T, cols] @ W.T
    moe(x, records, weights, spec, out, act="q8")   out[T, H] += sum_e w_e * w2_e(silu(w1_e x) * w3_e x)
        spec = ((fmt13, offset13, (2I, H)), (fmt2, offset2, (H, I)))
    act: "q8" computes block formats as llama.cpp's CPU matmuls do (activations quantized to
    the weight type's Q8_0 / Q8_1 / Q8_K blocks, integer dots); "f32" keeps fp32 activations.
    quantize_activations(x, fmt) -> (q int8 [T, n], d [T, n/32], s [T, n/32], bsum int32 [T, n/16])
        x's rows as act="q8" quantizes them for weights of format fmt (d: Q8_0/Q8_1 scales, fp16
        values; Q8_K: one fp32 scale per 256 in the first n/256 columns; s: Q8_1 only; bsum: Q8_K only)
    get_num_threads() / set_num_threads(n) / isa()
    q8_isa() / set_q8_isa(name or None): the integer dot of act="q8" ("avx512", "avx2" or "portable"; exact
        integer sums, so both give the same results; forcing one is for the tests)
llama.cpp's float order for the float ops of a GGUF's forward (csrc/cpu/fm_ggml_f32.c):
    f32_matmul(x, w) -> [T, rows]          softmax(x) -> rows of x soft-maxed
    rope_tables(start, T, n_dims, base) -> (cos, sin) [T, n_dims/2]
    rope_apply_(x, cos, sin) -> x          x [T, heads, d] rotated in place, pairs (i, i + d/2)
    attention(q, k, v, start, scale, interleaved=False) -> [T, H * d]   causal, q [T, H, d], k/v [S, Hkv, d]
"""
from libc.stdint cimport int64_t, uint8_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import torch as _torch

cdef extern from "fm_gguf_q8.h" nogil:
    ctypedef struct fmg_qact:
        int64_t n
        int64_t T
        signed char *q
        float *d
        float *s
        int *bsum
    int fmg_q8_supported(int type)
    int fmg_q8_quantize(int type, const float *x, int64_t T, int64_t ldx, int64_t n, fmg_qact *a)
    void fmg_q8_free(fmg_qact *a)
    int fmg_q8_set_isa(const char *isa)
    const char *fmg_q8_isa()

cdef extern from "fm_gguf.h" nogil:
    ctypedef struct fmg_mat:
        int type
        int64_t rows
        int64_t cols
        const uint8_t *data
    ctypedef struct fmg_expert:
        fmg_mat w13
        fmg_mat w2
    int64_t fmg_row_bytes(int type, int64_t cols)
    int fmg_dequant(const fmg_mat *w, int64_t r0, int64_t r1, float *out)
    int fmg_linear(const fmg_mat *w, const float *x, int64_t T, int64_t ldx, float *y, int64_t ldy,
                   float alpha, int accumulate, int act)
    int fmg_moe(const fmg_expert *ex, const float *weights, int k, const float *x, int64_t T, float *y, int act)
    int fmg_get_num_threads()
    void fmg_set_num_threads(int n)
    const char *fmg_isa()

ACTS = {"f32": 0, "q8": 1}
TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14, "mxfp4": 39}


def row_bytes(fmt, cols):
    cdef int64_t n = fmg_row_bytes(_type(fmt), cols)
    if n < 0:
        raise ValueError(f"format {fmt}: {cols} columns is not a whole number of blocks")
    return n


def get_num_threads():
    return fmg_get_num_threads()


def set_num_threads(int n):
    fmg_set_num_threads(n)


def isa():
    return fmg_isa().decode()


cdef int _type(fmt) except -1:
    try:
        return TYPES[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown GGUF block format {fmt!r}; supported: {', '.join(TYPES)}") from None


cdef int _act(act) except -1:
    try:
        return ACTS[act]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation mode {act!r}; supported: {', '.join(ACTS)}") from None


cdef uintptr_t _ptr(t, str name, dtype) except 0:
    if not isinstance(t, _torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty tensor")
    return <uintptr_t>t.data_ptr()


cdef int _mat(fmg_mat *m, buf, fmt, shape, int64_t offset, str name) except -1:
    m.type = _type(fmt)
    m.rows, m.cols = int(shape[0]), int(shape[1])
    cdef int64_t rb = fmg_row_bytes(m.type, m.cols)
    if rb < 0 or m.rows <= 0:
        raise ValueError(f"{name}: shape {tuple(shape)} is not whole {fmt} blocks")
    cdef uintptr_t p = _ptr(buf, name, _torch.uint8)
    if offset < 0 or offset + m.rows * rb > buf.numel():
        raise ValueError(f"{name}: needs bytes [{offset}, {offset + m.rows * rb}), the tensor holds {buf.numel()}")
    m.data = <const uint8_t *>(p + offset)
    return 0


cdef _check(int rc, str what):
    if rc == -2:
        raise MemoryError(f"{what}: out of memory")
    if rc != 0:
        raise ValueError(f"{what}: invalid arguments")


def dequantize(part, fmt, shape, int64_t offset=0):
    cdef fmg_mat m
    _mat(&m, part, fmt, shape, offset, "dequantize: part")
    out = _torch.empty((m.rows, m.cols), dtype=_torch.float32)
    cdef float *o = <float *><uintptr_t>out.data_ptr()
    cdef int rc
    with nogil:
        rc = fmg_dequant(&m, 0, m.rows, o)
    _check(rc, "dequantize")
    return out


def linear(x, part, fmt, shape, int64_t offset=0, act="q8"):
    cdef int a = _act(act)
    cdef fmg_mat m
    _mat(&m, part, fmt, shape, offset, "linear: part")
    if x.dim() != 2 or x.shape[1] != m.cols:
        raise ValueError(f"linear: x: expected [T, {m.cols}], got {list(x.shape)}")
    cdef const float *xp = <const float *>_ptr(x, "linear: x", _torch.float32)
    cdef int64_t T = x.shape[0]
    out = _torch.empty((T, m.rows), dtype=_torch.float32)
    cdef float *yp = <float *><uintptr_t>out.data_ptr()
    cdef int rc
    with nogil:
        rc = fmg_linear(&m, xp, T, m.cols, yp, m.rows, 1.0, 0, a)
    _check(rc, "linear")
    return out


def moe(x, records, weights, spec, out, act="q8"):
    cdef int a = _act(act)
    (f13, o13, s13), (f2, o2, s2) = spec
    cdef int k = len(records)
    if k == 0:
        return out
    if len(weights) != k:
        raise ValueError(f"moe: {k} records but {len(weights)} weights")
    H, I = int(s2[0]), int(s2[1])
    if x.dim() != 2 or x.shape[1] != H or list(out.shape) != list(x.shape):
        raise ValueError(f"moe: x and out must be [T, {H}], got {list(x.shape)} and {list(out.shape)}")
    cdef const float *xp = <const float *>_ptr(x, "moe: x", _torch.float32)
    cdef float *yp = <float *>_ptr(out, "moe: out", _torch.float32)
    cdef int64_t T = x.shape[0]
    cdef fmg_expert *ex = <fmg_expert *>malloc(k * sizeof(fmg_expert))
    cdef float *w = <float *>malloc(k * sizeof(float))
    cdef int rc, i
    if ex == NULL or w == NULL:
        free(ex)
        free(w)
        raise MemoryError("moe")
    try:
        for i in range(k):
            _mat(&ex[i].w13, records[i], f13, s13, o13, f"moe: record {i} w13")
            _mat(&ex[i].w2, records[i], f2, s2, o2, f"moe: record {i} w2")
            w[i] = float(weights[i])
        with nogil:
            rc = fmg_moe(ex, w, k, xp, T, yp, a)
        _check(rc, "moe")
    finally:
        free(ex)
        free(w)
    return out


def quantize_activations(x, fmt):
    cdef int t = _type(fmt)
    if not fmg_q8_supported(t):
        raise ValueError(f"format {fmt}: takes fp32 activations (no quantized vec_dot_type)")
    if x.dim() != 2:
        raise ValueError(f"quantize_activations: x: expected [T, n], got {list(x.shape)}")
    cdef const float *xp = <const float *>_ptr(x, "quantize_activations: x", _torch.float32)
    cdef int64_t T = x.shape[0], n = x.shape[1]
    row_bytes(fmt, n)  # whole blocks
    cdef fmg_qact a
    cdef int rc
    with nogil:
        rc = fmg_q8_quantize(t, xp, T, n, n, &a)
    _check(rc, "quantize_activations")
    try:
        q = _torch.empty((T, n), dtype=_torch.int8)
        d = _torch.empty((T, n // 32), dtype=_torch.float32)
        s = _torch.empty((T, n // 32), dtype=_torch.float32)
        b = _torch.empty((T, n // 16), dtype=_torch.int32)
        memcpy(<void *><uintptr_t>q.data_ptr(), a.q, T * n)
        memcpy(<void *><uintptr_t>d.data_ptr(), a.d, T * (n // 32) * 4)
        memcpy(<void *><uintptr_t>s.data_ptr(), a.s, T * (n // 32) * 4)
        memcpy(<void *><uintptr_t>b.data_ptr(), a.bsum, T * (n // 16) * 4)
    finally:
        fmg_q8_free(&a)
    return q, d, s, b


def q8_isa():
    return fmg_q8_isa().decode()


def set_q8_isa(name=None):
    cdef bytes b = name.encode() if name is not None else b""
    cdef int rc = fmg_q8_set_isa(<const char *>b if name is not None else NULL)
    if rc:
        raise ValueError(f"q8 integer dot {name!r} is not available here")


# ---------------------------------------------------------------- llama.cpp's float order (fm_ggml_f32.h)

cdef extern from "fm_ggml_f32.h" nogil:
    void fmg_f32_matmul(const float *x, int64_t T, int64_t ldx, const float *w, int64_t rows, int64_t ldw, int64_t n,
                        float *y, int64_t ldy)
    void fmg_softmax_row(float *x, int64_t n, int64_t valid, float scale)
    void fmg_rope_cache(int64_t pos, int64_t n_dims, float base, float *cos_out, float *sin_out)
    void fmg_rope_apply(float *x, int64_t T, int64_t heads, int64_t d, int64_t ld, const float *cos_t,
                        const float *sin_t)
    int fmg_attention(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv, int64_t T,
                      int64_t start, int64_t H, int64_t Hkv, int64_t d, float scale, int interleaved, float *out,
                      int64_t ldo)


def f32_matmul(x, w):
    """x [T, n] @ w.T (w [rows, n], fp32) in the float order of llama.cpp's F32 mul_mat."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"f32_matmul: x [T, n] and w [rows, n] expected, got {list(x.shape)} and {list(w.shape)}")
    cdef const float *xp = <const float *>_ptr(x, "f32_matmul: x", _torch.float32)
    cdef const float *wp = <const float *>_ptr(w, "f32_matmul: w", _torch.float32)
    cdef int64_t T = x.shape[0], rows = w.shape[0], n = w.shape[1]
    out = _torch.empty((T, rows), dtype=_torch.float32)
    cdef float *yp = <float *><uintptr_t>out.data_ptr()
    with nogil:
        fmg_f32_matmul(xp, T, n, wp, rows, n, n, yp, rows)
    return out


def softmax(x):
    """ggml's soft_max of each row of x [T, n] (a new tensor)."""
    if x.dim() != 2:
        raise ValueError(f"softmax: x [T, n] expected, got {list(x.shape)}")
    out = x.to(_torch.float32, copy=True).contiguous()
    cdef float *p = <float *>_ptr(out, "softmax: x", _torch.float32)
    cdef int64_t T = out.shape[0], n = out.shape[1], t
    with nogil:
        for t in range(T):
            fmg_softmax_row(p + t * n, n, n, 1.0)
    return out


def rope_tables(int64_t start, int64_t T, int64_t n_dims, float base):
    """(cos, sin) [T, n_dims/2] of RoPE's angles at positions start.. as ggml_rope_cache_init."""
    if T < 1 or n_dims < 2 or n_dims % 2:
        raise ValueError(f"rope_tables: T {T} and an even n_dims {n_dims} expected")
    cos = _torch.empty((T, n_dims // 2), dtype=_torch.float32)
    sin = _torch.empty((T, n_dims // 2), dtype=_torch.float32)
    cdef float *cp = <float *><uintptr_t>cos.data_ptr()
    cdef float *sp = <float *><uintptr_t>sin.data_ptr()
    cdef int64_t t, h = n_dims // 2
    with nogil:
        for t in range(T):
            fmg_rope_cache(start + t, n_dims, base, cp + t * h, sp + t * h)
    return cos, sin


def rope_apply_(x, cos, sin):
    """RoPE of x [T, heads, d] in place, pairs (i, i + d/2), tables [T, d/2] (ggml's order)."""
    if x.dim() != 3 or x.shape[2] % 2 or list(cos.shape) != [x.shape[0], x.shape[2] // 2] or cos.shape != sin.shape:
        raise ValueError(f"rope_apply_: x [T, heads, d] and tables [T, d/2] expected, got {list(x.shape)}, "
                         f"{list(cos.shape)}, {list(sin.shape)}")
    cdef float *p = <float *>_ptr(x, "rope_apply_: x", _torch.float32)
    cdef const float *cp = <const float *>_ptr(cos, "rope_apply_: cos", _torch.float32)
    cdef const float *sp = <const float *>_ptr(sin, "rope_apply_: sin", _torch.float32)
    cdef int64_t T = x.shape[0], heads = x.shape[1], d = x.shape[2]
    with nogil:
        fmg_rope_apply(p, T, heads, d, heads * d, cp, sp)
    return x


def attention(q, k, v, int64_t start, float scale, bint interleaved=False):
    """Causal attention as llama.cpp's non-flash CPU path: q [T, H, d] at positions start..,
    k, v [S, Hkv, d] (S >= start + T) -> [T, H * d]. interleaved: K.Q summed in the order of
    llama.cpp's permuted q/k rows (pairs (i, i + d/2) side by side)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"attention: q [T, H, d], k and v [S, Hkv, d] expected, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    cdef int64_t T = q.shape[0], H = q.shape[1], d = q.shape[2], Hkv = k.shape[1]
    if k.shape[0] < start + T or H % Hkv:
        raise ValueError(f"attention: {k.shape[0]} keys for positions up to {start + T}, heads {H} over {Hkv}")
    cdef const float *qp = <const float *>_ptr(q, "attention: q", _torch.float32)
    cdef const float *kp = <const float *>_ptr(k, "attention: k", _torch.float32)
    cdef const float *vp = <const float *>_ptr(v, "attention: v", _torch.float32)
    out = _torch.empty((T, H * d), dtype=_torch.float32)
    cdef float *op = <float *><uintptr_t>out.data_ptr()
    cdef int rc
    with nogil:
        rc = fmg_attention(qp, H * d, kp, Hkv * d, vp, Hkv * d, T, start, H, Hkv, d, scale, interleaved, op, H * d)
    _check(rc, "attention")
    return out
