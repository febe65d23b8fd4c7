# distutils: sources = csrc/cpu/fm_kernels.c csrc/cpu/fm_kernels_x86.c csrc/cpu/fm_kernels_xi.c csrc/cpu/fm_kernels_xi_x86.c csrc/cpu/fm_moe1.c csrc/cpu/fm_handoff.c
# distutils: include_dirs = csrc/cpu
# distutils: depends = csrc/cpu/fm_kernels.h csrc/cpu/fm_kernels_internal.h csrc/cpu/fm_kernels_xi.h csrc/cpu/fm_handoff.h
# distutils: libraries = m
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._cpu_kernels: fused dequant kernels for CPU (csrc/cpu/fm_kernels*.c).

Tensors are passed by data_ptr() and checked here (dtype, device, shape, contiguity, and that
every record is long enough for its layout), so the C code never reads out of bounds; the
kernels run with the GIL released on the module's own thread pool.

    FORMATS                              {"f32": 0, "f16": 1, "bf16": 2, "q8": 3, "q4": 4, "q2": 5}
    part_nbytes(fmt, rows, cols) -> int  bytes of one part (as quant.part_nbytes)
    part_sections(fmt, rows, cols)       [(name, offset, nbytes)] (as quant.sections)
    linear(x, part, fmt, shape, out=None, offset=0, alpha=1.0, accumulate=False) -> out
                                         out[T, rows] (+)= alpha * x[T, cols] @ W.T
    ExpertSpec(w13=(fmt, offset, (2I, H)), w2=(fmt, offset, (H, I)))   an expert record layout
    moe(x, records, weights, spec, out)  out[T, H] += sum_e weights[e] * w2_e(silu(w1_e x) * w3_e x)
    expert_ffn(x, record, spec, out=None, weight=1.0) -> out    moe() with one expert
    dequantize(part, fmt, shape, offset=0, dtype=torch.float32, out=None) -> [rows, cols]
                                         the float matrix (as quant.dequantize), multi-threaded
    get_num_threads() / set_num_threads(n)   the pool size (n <= 0: all usable CPUs)
    get_spin_us() / set_spin_us(us)          how long idle workers spin before they sleep
    isa() / max_isa() / set_isa(name) / isa_levels()   "portable" | "avx2" | "avx512"
                                         (env FLASHMOE_CPU_ISA picks the level at import)
    HybridPlan(ready, done, packs, outs, records, spec, t_ready, ids).run(seq, timeout_s)
                                         a decode token's n_cpu_moe layers in one call, handed
                                         over through flags (csrc/cpu/fm_handoff.h)
    int_act() / set_int_act(on)          decode (one token) of q4 / q8 with 21-bit integer
                                         activations and integer dots (default; env
                                         FLASHMOE_CPU_ACT=f32 turns it off at import)
    moe1() / set_moe1(n)                 moe()'s decode in one pass without phase barriers
                                         (csrc/cpu/fm_moe1.c), ~n tasks a thread; 0: two phases
                                         (default 4; env FLASHMOE_CPU_MOE1=n at import);
                                         moe1_count(): calls that took it
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc

import torch as _torch

cdef extern from "fm_kernels.h" nogil:
    enum:
        FM_F32
        FM_F16
        FM_BF16
        FM_Q8
        FM_Q4
        FM_Q2
        FM_NISA
        FMK_OK
        FMK_EINVAL
        FMK_ENOMEM
        FMK_EISA
    ctypedef struct fm_mat:
        int fmt
        int64_t rows
        int64_t cols
    ctypedef struct fm_expert:
        fm_mat w13
        fm_mat w2
    const char *fm_strerror(int code)
    int fm_part_sections(int fmt, int64_t rows, int64_t cols, int64_t *offsets, int64_t *nbytes)
    int64_t fm_part_nbytes(int fmt, int64_t rows, int64_t cols)
    int fm_mat_init(fm_mat *m, int fmt, int64_t rows, int64_t cols, const void *base)
    int fm_max_isa()
    int fm_get_isa()
    int fm_set_isa(int isa)
    const char *fm_isa_name(int isa)
    int fm_get_num_threads()
    void fm_set_num_threads(int n)
    long fm_get_spin_us()
    void fm_set_spin_us(long us)
    int fm_linear(const fm_mat *w, const float *x, int64_t T, int64_t ldx, float *y, int64_t ldy,
                  float alpha, int accumulate)
    int fm_moe(const fm_expert *experts, const float *weights, int k, const float *x, int64_t T, float *y)
    int fm_dequant(const fm_mat *w, int64_t r0, int64_t r1, void *out, int64_t ldo, int out_fmt)
    int fm_get_int_act()
    void fm_set_int_act(int on)
    int fm_get_moe1()
    void fm_set_moe1(int tasks_per_thread)

cdef extern from "fm_handoff.h" nogil:
    enum:
        FMK_ETIMEDOUT
    ctypedef struct fm_hybrid_layer:
        uint32_t *ready
        uint32_t *done
        const float *pack
        float *out
        const uint8_t **records
        int n_experts
    ctypedef struct fm_hybrid_spec:
        int w13_fmt, w2_fmt
        int64_t w13_off, w2_off, H, I
        int k
    int fm_hybrid_token(const fm_hybrid_layer *layers, int n, const fm_hybrid_spec *spec, uint32_t seq,
                        int64_t timeout_ns, int64_t *t_ready, int32_t *ids_out, int *bad_layer)

cdef extern from "fm_kernels_internal.h":
    enum:
        FM_MAX_COLS
    int64_t fm_moe1_count()

FORMATS = {"f32": FM_F32, "f16": FM_F16, "bf16": FM_BF16, "q8": FM_Q8, "q4": FM_Q4, "q2": FM_Q2}
MAX_COLS = FM_MAX_COLS
_SECTION_NAMES = {FM_Q8: ("q", "scales"), FM_Q4: ("q", "scales", "biases"), FM_Q2: ("q", "scales", "biases")}


cdef int _fmt_code(fmt, str what) except -1:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"{what}: unknown weight format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


cdef _raise(int rc, str what):
    msg = f"{what}: {fm_strerror(rc).decode()}"
    if rc == FMK_ENOMEM:
        raise MemoryError(msg)
    raise ValueError(msg)


cdef tuple _shape2(shape, str what):
    try:
        rows, cols = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a 2-D shape (rows, cols), got {shape!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"{what}: shape must be positive, got {(rows, cols)}")
    return rows, cols


def part_nbytes(fmt, rows, cols):
    """Bytes of one part of format fmt and shape (rows, cols), as quant.part_nbytes."""
    cdef int f = _fmt_code(fmt, "part_nbytes")
    cdef int64_t n = fm_part_nbytes(f, rows, cols)
    if n < 0:
        raise ValueError(f"part_nbytes: invalid shape {(rows, cols)} for format {fmt}"
                         + (f" (cols must be a multiple of 64)" if f >= FM_Q8 else ""))
    return n


def part_sections(fmt, rows, cols):
    """[(name, offset, nbytes)] of one part, as quant.sections."""
    cdef int f = _fmt_code(fmt, "part_sections")
    cdef int64_t off[3]
    cdef int64_t nb[3]
    if fm_part_sections(f, rows, cols, off, nb) != FMK_OK:
        raise ValueError(f"part_sections: invalid shape {(rows, cols)} for format {fmt}")
    names = _SECTION_NAMES.get(f, ("w",))
    return [(names[i], off[i], nb[i]) for i in range(len(names))]


# ------------------------------------------------------------------------------- tensor checks

cdef object _F32 = _torch.float32
cdef object _U8 = _torch.uint8
cdef object _Tensor = _torch.Tensor


cdef uintptr_t _ptr(t, name, dtype, bint writable=False) except 0:
    """data_ptr() of a contiguous CPU tensor of dtype; clear errors otherwise. Cheap attribute
    checks only (a decode step calls this for every record)."""
    if not isinstance(t, _Tensor):
        raise TypeError(f"{_name(name)}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype is not dtype:
        raise ValueError(f"{_name(name)}: expected dtype {dtype}, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{_name(name)}: expected a CPU tensor, got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{_name(name)}: expected a contiguous tensor (call .contiguous())")
    if writable and t.requires_grad:
        raise ValueError(f"{_name(name)}: output tensors must not require grad")
    cdef uintptr_t p = t.data_ptr()
    if p == 0:
        if t.numel() == 0:
            return 1  # an empty tensor: callers return before any access (T == 0) or reject it as too short
        raise ValueError(f"{_name(name)}: tensor has no storage")
    return p


cdef str _name(name):
    # names are built only for error messages: (prefix, index) -> "prefix[index]"
    if isinstance(name, tuple):
        return f"{name[0]}[{name[1]}]"
    return name


cdef uintptr_t _part_ptr(buf, str name, int fmt, int64_t rows, int64_t cols, int64_t offset) except 0:
    cdef uintptr_t p = _ptr(buf, name, _U8)
    if buf.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D uint8 tensor (a record or part), got shape {tuple(buf.shape)}")
    cdef int64_t need = fm_part_nbytes(fmt, rows, cols)
    if need < 0:
        raise ValueError(f"{name}: invalid shape {(rows, cols)} for its format"
                         + (" (cols must be a multiple of 64)" if fmt >= FM_Q8 else ""))
    if cols > FM_MAX_COLS:
        raise ValueError(f"{name}: cols {cols} exceeds the kernels' limit of {FM_MAX_COLS}")
    if offset < 0:
        raise ValueError(f"{name}: negative offset {offset}")
    cdef int64_t have = buf.numel()
    if offset > have or need > have - offset:  # not offset + need: that overflows int64
        raise ValueError(f"{name}: too short: the part needs bytes [{offset}, {offset + need}) "
                         f"but the tensor holds {have} bytes")
    return p + <uintptr_t>offset


def linear(x, part, fmt, shape, out=None, int64_t offset=0, float alpha=1.0, bint accumulate=False):
    """out[T, rows] = alpha * x[T, cols] @ W.T (+ out if accumulate) for the weight part of format
    fmt and shape (rows, cols) stored in the uint8 tensor `part` at byte `offset`. x may also be
    1-D [cols] (then out is [rows]). Returns out."""
    cdef int f = _fmt_code(fmt, "linear: fmt")
    rows, cols = _shape2(shape, "linear: shape")
    cdef int64_t R = rows, C = cols
    cdef uintptr_t wp = _part_ptr(part, "linear: part", f, R, C, offset)
    cdef uintptr_t xp = _ptr(x, "linear: x", _F32)
    one_d = x.dim() == 1
    if one_d:
        if x.shape[0] != C:
            raise ValueError(f"linear: x: expected shape [{C}] or [T, {C}], got {list(x.shape)}")
        T = 1
    elif x.dim() == 2 and x.shape[1] == C:
        T = x.shape[0]
    else:
        raise ValueError(f"linear: x: expected shape [T, {C}], got {list(x.shape)}")
    want = [R] if one_d else [T, R]
    if out is None:
        if accumulate:
            raise ValueError("linear: accumulate=True needs an out tensor")
        out = _torch.empty(want, dtype=_torch.float32)
    cdef uintptr_t yp = _ptr(out, "linear: out", _F32, True)
    if list(out.shape) != want:
        raise ValueError(f"linear: out: expected shape {want}, got {list(out.shape)}")
    if T == 0:
        return out
    cdef fm_mat m
    cdef int rc = fm_mat_init(&m, f, R, C, <const void *>wp)
    if rc != FMK_OK:
        _raise(rc, "linear")
    cdef int64_t nt = T
    cdef int acc = accumulate
    with nogil:
        rc = fm_linear(&m, <const float *>xp, nt, C, <float *>yp, R, alpha, acc)
    if rc != FMK_OK:
        _raise(rc, "linear")
    return out


def dequantize(part, fmt, shape, int64_t offset=0, dtype=None, out=None):
    """The float matrix [rows, cols] of a part (as quant.dequantize), float32 or bfloat16, on the
    kernels' threads. Used for prefill with many tokens (dequantize once, then a BLAS GEMM)."""
    cdef int f = _fmt_code(fmt, "dequantize: fmt")
    rows, cols = _shape2(shape, "dequantize: shape")
    cdef int64_t R = rows, C = cols
    cdef uintptr_t wp = _part_ptr(part, "dequantize: part", f, R, C, offset)
    if dtype is None:
        dtype = _F32 if out is None else out.dtype
    cdef int of
    if dtype is _F32:
        of = FM_F32
    elif dtype is _torch.bfloat16:
        of = FM_BF16
    else:
        raise ValueError(f"dequantize: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if out is None:
        out = _torch.empty((R, C), dtype=dtype)
    cdef uintptr_t op = _ptr(out, "dequantize: out", dtype, True)
    if tuple(out.shape) != (R, C):
        raise ValueError(f"dequantize: out: expected shape {[R, C]}, got {list(out.shape)}")
    cdef fm_mat m
    cdef int rc = fm_mat_init(&m, f, R, C, <const void *>wp)
    if rc == FMK_OK:
        with nogil:
            rc = fm_dequant(&m, 0, R, <void *>op, C, of)
    if rc != FMK_OK:
        _raise(rc, "dequantize")
    return out


cdef class ExpertSpec:
    """Where w13 [2I, H] and w2 [H, I] sit in an expert record: each part (fmt, offset, shape).
    Build once per layout; `min_bytes` is the shortest record it accepts."""
    cdef readonly int w13_fmt, w2_fmt
    cdef readonly int64_t w13_off, w2_off, H, I, min_bytes

    def __init__(self, w13, w2):
        f13, o13, s13 = w13
        f2, o2, s2 = w2
        self.w13_fmt = _fmt_code(f13, "ExpertSpec: w13")
        self.w2_fmt = _fmt_code(f2, "ExpertSpec: w2")
        r13, c13 = _shape2(s13, "ExpertSpec: w13 shape")
        r2, c2 = _shape2(s2, "ExpertSpec: w2 shape")
        if r13 != 2 * c2 or c13 != r2:
            raise ValueError(f"ExpertSpec: w13 must be [2I, H] and w2 [H, I]; got w13 {[r13, c13]}, w2 {[r2, c2]}")
        self.H, self.I = r2, c2
        self.w13_off, self.w2_off = int(o13), int(o2)
        if self.w13_off < 0 or self.w2_off < 0:
            raise ValueError("ExpertSpec: negative part offset")
        n13 = fm_part_nbytes(self.w13_fmt, r13, c13)
        n2 = fm_part_nbytes(self.w2_fmt, r2, c2)
        if n13 < 0:
            raise ValueError(f"ExpertSpec: w13 shape {[r13, c13]} is invalid for format {f13} (cols must be a multiple of 64)")
        if n2 < 0:
            raise ValueError(f"ExpertSpec: w2 shape {[r2, c2]} is invalid for format {f2} (cols must be a multiple of 64)")
        if c13 > FM_MAX_COLS or c2 > FM_MAX_COLS:
            raise ValueError(f"ExpertSpec: dimensions above the kernels' limit of {FM_MAX_COLS}")
        self.min_bytes = max(self.w13_off + n13, self.w2_off + n2)

    @classmethod
    def from_layout(cls, layout):
        """From a store.layout.RecordLayout (parts "w13" and "w2")."""
        p13, p2 = layout.part("w13"), layout.part("w2")
        return cls((p13.format, p13.offset, p13.shape), (p2.format, p2.offset, p2.shape))

    def __repr__(self):
        return (f"ExpertSpec(H={self.H}, I={self.I}, w13={fm_fmt_name(self.w13_fmt)}@{self.w13_off}, "
                f"w2={fm_fmt_name(self.w2_fmt)}@{self.w2_off}, min_bytes={self.min_bytes})")


def fm_fmt_name(int code):
    for k, v in FORMATS.items():
        if v == code:
            return k
    return "?"


def moe(x, records, weights, ExpertSpec spec not None, out):
    """out[T, H] += sum_e weights[e] * expert_e(x[T, H]) for the uint8 records laid out by spec, in
    one native call (decode: T = 1 and the layer's k selected experts; prefill: one expert, T
    tokens). weights: a sequence of floats or a 1-D tensor, one per record. Returns out."""
    cdef uintptr_t xp = _ptr(x, "moe: x", _F32)
    cdef uintptr_t yp = _ptr(out, "moe: out", _F32, True)
    xs = x.shape
    if len(xs) != 2 or xs[1] != spec.H:
        raise ValueError(f"moe: x: expected shape [T, {spec.H}], got {list(xs)}")
    if out.shape != xs:
        raise ValueError(f"moe: out: expected shape {list(xs)} (as x), got {list(out.shape)}")
    if not isinstance(records, (list, tuple)):
        records = list(records)
    if isinstance(weights, _Tensor):
        if weights.dim() != 1:
            raise ValueError(f"moe: weights: expected a 1-D tensor, got shape {list(weights.shape)}")
        weights = weights.tolist() if weights.is_cpu else weights.detach().cpu().tolist()
    cdef int k = len(records)
    if len(weights) != k:
        raise ValueError(f"moe: got {k} records but {len(weights)} weights")
    cdef int64_t T = xs[0]
    if k == 0 or T == 0:
        return out
    cdef fm_expert *ex = <fm_expert *>malloc(k * sizeof(fm_expert))
    cdef float *wts = <float *>malloc(k * sizeof(float))
    cdef uintptr_t rp
    cdef int rc = FMK_OK, e
    cdef int64_t need = spec.min_bytes
    try:
        if ex == NULL or wts == NULL:
            raise MemoryError("moe: cannot allocate the expert table")
        for e in range(k):
            rec = records[e]
            rp = _ptr(rec, ("moe: records", e), _U8)
            if rec.dim() != 1:
                raise ValueError(f"moe: records[{e}]: expected a 1-D uint8 tensor, got shape {list(rec.shape)}")
            if rec.numel() < need:
                raise ValueError(f"moe: records[{e}]: too short: {rec.numel()} bytes, the layout needs {need}")
            rc = fm_mat_init(&ex[e].w13, spec.w13_fmt, 2 * spec.I, spec.H, <const void *>(rp + <uintptr_t>spec.w13_off))
            if rc == FMK_OK:
                rc = fm_mat_init(&ex[e].w2, spec.w2_fmt, spec.H, spec.I, <const void *>(rp + <uintptr_t>spec.w2_off))
            if rc != FMK_OK:
                _raise(rc, f"moe: records[{e}]")
            wts[e] = weights[e]
        with nogil:
            rc = fm_moe(ex, wts, k, <const float *>xp, T, <float *>yp)
        if rc != FMK_OK:
            _raise(rc, "moe")
    finally:
        free(ex)
        free(wts)
    return out


def expert_ffn(x, record, ExpertSpec spec not None, out=None, float weight=1.0):
    """One expert over T tokens: out[T, H] (+)= weight * w2(silu(w1 x) * w3 x). With out=None a new
    zero-initialised tensor is returned."""
    if out is None:
        if not isinstance(x, _torch.Tensor) or x.dim() != 2:
            raise ValueError("expert_ffn: x: expected a 2-D float32 tensor [T, H]")
        out = _torch.zeros(x.shape, dtype=_torch.float32)
    return moe(x, (record,), (weight,), spec, out)


# ------------------------------------------------------------------------------ configuration

def get_num_threads():
    """Threads the kernels use (the pool includes the calling thread)."""
    return fm_get_num_threads()


def set_num_threads(int n):
    """Set the pool size; n <= 0 picks all CPUs this process may use."""
    fm_set_num_threads(n)


def get_spin_us():
    """How long idle pool workers spin for the next job before they sleep (microseconds)."""
    return fm_get_spin_us()


def set_spin_us(long us):
    """Set it (default 50, or FLASHMOE_CPU_SPIN_US): jobs further apart than that wake sleeping workers."""
    fm_set_spin_us(us)


def isa():
    """The instruction-set level the kernels use now: 'portable', 'avx2' or 'avx512'."""
    return fm_isa_name(fm_get_isa()).decode()


def max_isa():
    """The best level this CPU (and build) supports."""
    return fm_isa_name(fm_max_isa()).decode()


def isa_levels():
    """Every level usable here, lowest first."""
    return [fm_isa_name(i).decode() for i in range(fm_max_isa() + 1)]


def set_isa(str name):
    """Force an instruction-set level (tests compare them); ValueError if unsupported here."""
    for i in range(FM_NISA):
        if fm_isa_name(i).decode() == name:
            if fm_set_isa(i) != FMK_OK:
                raise ValueError(f"set_isa: {name!r} is not supported on this CPU (best: {max_isa()!r})")
            return
    raise ValueError(f"set_isa: unknown level {name!r}; expected one of portable, avx2, avx512")


def int_act():
    """Whether decode of q4 / q8 weights uses integer activations (csrc/cpu/fm_kernels_xi.c)."""
    return bool(fm_get_int_act())


def set_int_act(bint on):
    """Integer activations for decode of q4 / q8 (on, the default) or fp32 activations (off)."""
    fm_set_int_act(on)


def moe1():
    """Tasks a thread of moe()'s one-pass decode (csrc/cpu/fm_moe1.c); 0: the two-phase path."""
    return fm_get_moe1()


def set_moe1(int tasks_per_thread):
    """moe()'s decode (one token, q4 / q8 with integer activations, 2+ threads) in one pass
    without a barrier between gate/up and down, ~tasks_per_thread tasks a thread in each phase;
    0: the two phases of prefill (the path before session 11). Same bits either way."""
    fm_set_moe1(tasks_per_thread)


def moe1_count():
    """How many moe() calls took the one-pass decode so far (tests check that it ran)."""
    return fm_moe1_count()


# ------------------------------------------------------------------------------ hybrid token

cdef class HybridPlan:
    """A decode token's n_cpu_moe layers as one host call (csrc/cpu/fm_handoff.h), built once:
    ready, done: int32 [n, m] (layer j's flag at [j, 0], m spacing the flags apart); packs: fp32
    [n, H + 2k] (x, weights, ids); outs: fp32 [n, H]; records: n sequences of the layer's expert
    records (uint8, each at least spec.min_bytes); t_ready: int64 [n] (ns when each row was
    seen); ids: int32 [n, k] (the experts run). The tensors are kept alive by the plan."""
    cdef fm_hybrid_layer *layers
    cdef const uint8_t **recs
    cdef fm_hybrid_spec spec
    cdef int n
    cdef int64_t *t_ready
    cdef int32_t *ids
    cdef object keep

    def __cinit__(self):
        self.layers = NULL
        self.recs = NULL

    def __dealloc__(self):
        free(self.layers)
        free(self.recs)

    def __init__(self, ready, done, packs, outs, records, ExpertSpec spec not None, t_ready, ids):
        cdef int n = len(records)
        cdef int k = (packs.shape[1] - spec.H) // 2 if packs.dim() == 2 else 0
        if k < 1 or k > 64 or packs.shape[1] != spec.H + 2 * k:
            raise ValueError(f"HybridPlan: packs: expected [n, H + 2k] with H {spec.H} and 1 <= k <= 64, got {list(packs.shape)}")
        for name, t, shape in (("ready", ready, None), ("done", done, None), ("packs", packs, [n, spec.H + 2 * k]),
                               ("outs", outs, [n, spec.H]), ("t_ready", t_ready, [n]), ("ids", ids, [n, k])):
            if t.shape[0] != n or (shape is not None and list(t.shape) != shape):
                raise ValueError(f"HybridPlan: {name}: expected {shape or [n, '*']}, got {list(t.shape)}")
        _I32, _I64 = _torch.int32, _torch.int64
        cdef uintptr_t rp = _ptr(ready, "HybridPlan: ready", _I32, True)
        cdef uintptr_t dp = _ptr(done, "HybridPlan: done", _I32, True)
        cdef uintptr_t pp = _ptr(packs, "HybridPlan: packs", _F32)
        cdef uintptr_t op = _ptr(outs, "HybridPlan: outs", _F32, True)
        self.t_ready = <int64_t *>_ptr(t_ready, "HybridPlan: t_ready", _I64, True)
        self.ids = <int32_t *>_ptr(ids, "HybridPlan: ids", _I32, True)
        cdef int64_t fs = ready.stride(0), ds = done.stride(0), total = sum(len(r) for r in records)
        self.layers = <fm_hybrid_layer *>malloc(max(1, n) * sizeof(fm_hybrid_layer))
        self.recs = <const uint8_t **>malloc(max(1, total) * sizeof(uint8_t *))
        if self.layers == NULL or self.recs == NULL:
            raise MemoryError("HybridPlan: cannot allocate its tables")
        cdef int j, e, at = 0
        for j in range(n):
            self.layers[j].ready = <uint32_t *>(rp + 4 * j * fs)
            self.layers[j].done = <uint32_t *>(dp + 4 * j * ds)
            self.layers[j].pack = <const float *>(pp + 4 * j * (spec.H + 2 * k))
            self.layers[j].out = <float *>(op + 4 * j * spec.H)
            self.layers[j].records = self.recs + at
            self.layers[j].n_experts = len(records[j])
            for e, rec in enumerate(records[j]):
                if rec.dim() != 1 or rec.numel() < spec.min_bytes:
                    raise ValueError(f"HybridPlan: records[{j}][{e}]: expected a 1-D uint8 record of at least "
                                     f"{spec.min_bytes} bytes, got shape {list(rec.shape)}")
                self.recs[at] = <const uint8_t *>_ptr(rec, ("HybridPlan: records", e), _U8)
                at += 1
        self.spec.w13_fmt, self.spec.w2_fmt = spec.w13_fmt, spec.w2_fmt
        self.spec.w13_off, self.spec.w2_off, self.spec.H, self.spec.I = spec.w13_off, spec.w2_off, spec.H, spec.I
        self.spec.k = k
        self.n = n
        self.keep = (ready, done, packs, outs, list(map(list, records)), t_ready, ids)

    def run(self, uint32_t seq, double timeout_s=10.0):
        """Layers 0..n-1 of the token with sequence number seq (GIL released): each waited for
        (its ready flag == seq), computed into its out row, released (done = seq)."""
        cdef int bad = -1, rc
        cdef int64_t t = <int64_t>(timeout_s * 1e9)
        with nogil:
            rc = fm_hybrid_token(self.layers, self.n, &self.spec, seq, t, self.t_ready, self.ids, &bad)
        if rc == FMK_ETIMEDOUT:
            raise TimeoutError(f"HybridPlan: CPU layer {bad} of the token (sequence {seq}): its row did not "
                               f"arrive within {timeout_s} s")
        if rc != FMK_OK:
            _raise(rc, f"HybridPlan: CPU layer {bad} of the token (sequence {seq}; an expert id out of range?)")
