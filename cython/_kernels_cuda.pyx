# distutils: sources = csrc/cuda/fm_kernels.cu csrc/cuda/fm_gemv.cu csrc/cuda/fm_route.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_cuda.h
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._kernels_cuda: fused dequant kernels for NVIDIA GPUs (csrc/cuda/fm_kernels.cu).

Built only where nvcc is found; links the CUDA toolkit's runtime, never libtorch. Tensors are
passed by data_ptr() and checked here (dtype, device, shape, contiguity, alignment, and that
every weight buffer is long enough for its format), so the kernels never read out of bounds.
Every call is asynchronous on `stream` (a cudaStream_t as an int, e.g.
torch.cuda.current_stream().cuda_stream; None means that current stream), and runs with the
GIL released.

    FORMATS                                  {"q8": 3, "q4": 4, "q2": 5}
    device_count() -> int                    GPUs the CUDA runtime sees (0 when none / no driver)
    part_nbytes(fmt, rows, cols) -> int      bytes of one part (as quant.part_nbytes)
    workspace_bytes(k, inter) -> int         bytes of the workspace moe() needs (first 256 zeroed)
    linear(part, fmt, rows, cols, x, out, stream=None)
                                             out[T, rows] = x[T, cols] @ W.T   (GEMV at T = 1)
    gemv(parts, fmt, rows, cols, x, out, stream=None)
                                             out[T, sum rows] = x @ [W_0; W_1; ...].T in one launch
        (csrc/cuda/fm_gemv.cu: q8/q4 parts, T = 1..4, bf16/f16 x; up to GEMV_MAX_PARTS parts)
    gemv_norm(parts, fmt, rows, cols, h, hd, nw, eps, hs, out, stream=None)
                                             gemv at one token of x = rms_norm(h + hd) * nw, h + hd into hs
    route(h, o, nw, router, k, eps, norm_topk, entries, base, stride, h2, x, weights, ids, ids_row, addrs, stream=None)
                                             a decode token's routing after attention (csrc/cuda/fm_route.cu)
    gemv_tune(key, value=None) -> int        its knobs (split, warps, pdl, kernel, grid) and last launch figures
    moe(records, layout, weights, x, out, workspace, stream=None, mode="auto")
                                             out[T, H] = sum_e weights[e] * w2_e(silu(w1_e x) * w3_e x)
        records: list of uint8 CUDA tensors (k <= 32), or an int64 CUDA tensor of k record addresses
        layout: (fmt, hidden, inter, w13_offset, w2_offset, record_nbytes)
        weights: None (all 1), a list/CPU tensor of k floats, or a CUDA tensor of k floats
        mode: "auto" | "coop" (one launch, grid barrier) | "two" (two launches)
    dequant(part, fmt, rows, cols, out, stream=None)   out[rows, cols] = the dequantized matrix
    tune(key, value=None) -> int             tuning knobs / last launch figures (benchmarks)

x and out are float32, bfloat16 or float16. With float32 activations the kernels keep x to
~2^-31 of each group's maximum (two int16 limbs); with 16-bit activations one limb (2^-16).
"""
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc

import torch as _torch

cdef extern from "fm_cuda.h" nogil:
    enum:
        FMC_Q8
        FMC_Q4
        FMC_Q2
        FMC_F32
        FMC_F16
        FMC_BF16
        FMC_MODE_AUTO
        FMC_MODE_COOP
        FMC_MODE_TWO_LAUNCH
        FMC_MAX_K
        FMC_MAX_NT
    ctypedef struct fmc_layout:
        int fmt
        int64_t hidden
        int64_t inter
        int64_t w13_off
        int64_t w2_off
    const char *fmc_strerror(int code)
    int fmc_device_count()
    int fmc_version()
    int fmc_part_sections(int fmt, int64_t rows, int64_t cols, int64_t *offsets, int64_t *nbytes)
    size_t fmc_moe_workspace_bytes(int k, int64_t inter)
    int64_t fmc_tune(int key, int64_t value)
    int fmc_moe(const fmc_layout *layout, int k, const uint64_t *recs, int recs_on_device,
                const void *w_dev, int w_dtype, const float *w_host,
                const void *x, int x_dtype, int64_t T, void *out, int out_dtype,
                void *workspace, size_t workspace_bytes, int mode, int device, void *stream)
    int fmc_linear(int fmt, const void *part, int64_t N, int64_t K, const void *x, int x_dtype,
                   int64_t T, void *y, int y_dtype, int device, void *stream)
    int fmc_dequant(int fmt, const void *part, int64_t N, int64_t K, void *out, int out_dtype,
                    int device, void *stream)
    enum:
        FMC_GEMV_MAX_PARTS
    int fmc_gemv(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *x,
                 int x_dtype, int64_t T, void *y, int y_dtype, int device, void *stream)
    int64_t fmc_gemv_tune(int key, int64_t value)
    int fmc_gemv_norm(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *h,
                      const void *hd, const void *nw, float eps, void *hs, int x_dtype, void *y, int y_dtype,
                      int device, void *stream)
    enum:
        FMC_ROUTE_MAX_H
        FMC_ROUTE_MAX_E
    int fmc_route(const void *h, const void *o, const void *nw, const void *router, int64_t H, int64_t E, int k,
                  float eps, int norm_topk, const int64_t *entries, const int64_t *base, int64_t stride, void *h2,
                  void *x, void *weights, int64_t *ids, int64_t *ids_row, int64_t *addrs, int dtype, int device,
                  void *stream)


FORMATS = {"q8": FMC_Q8, "q4": FMC_Q4, "q2": FMC_Q2}
MAX_K = FMC_MAX_K
MAX_TOKENS_PER_LAUNCH = FMC_MAX_NT
GEMV_MAX_PARTS = FMC_GEMV_MAX_PARTS
GEMV_MAX_TOKENS = 4
ROUTE_MAX_H = FMC_ROUTE_MAX_H
ROUTE_MAX_E = FMC_ROUTE_MAX_E
_MODES = {"auto": FMC_MODE_AUTO, "coop": FMC_MODE_COOP, "two": FMC_MODE_TWO_LAUNCH}
_DTYPES = {_torch.float32: FMC_F32, _torch.float16: FMC_F16, _torch.bfloat16: FMC_BF16}


class CudaKernelError(RuntimeError):
    """A CUDA launch or runtime call failed (the message carries the CUDA error)."""


def version():
    return fmc_version()


def device_count():
    """GPUs the CUDA runtime sees; 0 when there is none or no usable driver."""
    n = fmc_device_count()
    return n if n > 0 else 0


def device_error():
    """Why the runtime sees no GPU ('' when it sees one)."""
    n = fmc_device_count()
    if n > 0:
        return ""
    if n == 0:
        return "the CUDA runtime sees no device"
    return fmc_strerror(-n).decode()


cdef int _fmt(fmt) except -1:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported weight format {fmt!r} for the CUDA kernels; supported: "
                         f"{', '.join(FORMATS)} (raw f32/f16/bf16 parts go through torch)") from None


cdef int _check(int rc, what) except -1:
    if rc == 0:
        return 0
    msg = fmc_strerror(rc).decode()
    if rc > 0:
        raise CudaKernelError(f"{what}: CUDA error {rc}: {msg}")
    raise ValueError(f"{what}: {msg}")


def part_nbytes(fmt, int64_t rows, int64_t cols):
    cdef int64_t off[3]
    cdef int64_t n = 0
    if fmc_part_sections(_fmt(fmt), rows, cols, off, &n) != 0:
        raise ValueError(f"format {fmt}: bad shape ({rows}, {cols}); cols must be a positive multiple of 64")
    return n


def workspace_bytes(int k, int64_t inter):
    return fmc_moe_workspace_bytes(k, inter)


_TUNE_KEYS = {"prefetch": 0, "max_blocks_per_sm": 1, "last_grid": 2, "last_blocks_per_sm": 3, "last_smem": 4, "pdl": 5,
              "stages": 6, "last_stages": 7, "auto_mode": 8, "coop_trigger": 9,
              "bulk": 10}


def tune(key, value=None):
    """A tuning knob of the kernels (process-wide), for benchmarks; returns the previous value.
    keys: prefetch (phase-B L2 prefetch window per block, bytes; 0 = off, the default), max_blocks_per_sm
    (0: occupancy limit), pdl (1: programmatic dependent launch for plain launches on sm_90+, the
    default; 0 off), stages (weight ring depth per warp: 0 = auto, the default, or 3, 4, 6), auto_mode
    (what moe's mode "auto" runs: 0 one cooperative launch, the default; 1 two launches), coop_trigger (1, the
    default: a cooperative launch lets the next PDL launch start at its phase B; 0 off), bulk (the one-token MoE's
    weight stream: 1 sm_90 bulk copies where the ring would run one block per SM and rows are long (q4: hidden
    and inter multiples of 1024, at least 4096), the default; 2 bulk wherever it fits; 0 the cp.async ring); read-only:
    last_grid, last_blocks_per_sm, last_smem, last_stages (what the last launch used). value None only reads."""
    try:
        k = _TUNE_KEYS[key]
    except KeyError:
        raise ValueError(f"unknown tuning key {key!r}; known: {', '.join(_TUNE_KEYS)}") from None
    return fmc_tune(k, -1 if value is None else int(value))


cdef int _device(t, name, device) except -2:
    """The CUDA device index of tensor t (checked against `device` unless that is -1)."""
    if not isinstance(t, _torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
    cdef int d = t.device.index if t.device.index is not None else _torch.cuda.current_device()
    if device >= 0 and d != device:
        raise ValueError(f"{name} is on cuda:{d}, the other tensors on cuda:{device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return d


cdef int _act_dtype(t, name) except -1:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}") from None


cdef _check_part(part, name, int fmt, int64_t rows, int64_t cols, int64_t need, int device):
    _device(part, name, device)
    if part.dtype != _torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor (packed weights), got {part.dtype}")
    if part.numel() < need:
        raise ValueError(f"{name} holds {part.numel()} bytes, the part needs {need}")
    if part.data_ptr() % 16:
        raise ValueError(f"{name} must start on a 16-byte boundary (data_ptr {part.data_ptr():#x})")


cdef _stream(stream, int device):
    if stream is None:
        return _torch.cuda.current_stream(device).cuda_stream
    return int(stream)


cdef tuple _act2d(t, name, int64_t cols):
    """(T, dtype code) of an activation matrix [T, cols] (or a vector [cols])."""
    if t.dim() == 1:
        if t.shape[0] != cols:
            raise ValueError(f"{name} has {t.shape[0]} values, expected {cols}")
        return 1, _act_dtype(t, name)
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must have shape [T, {cols}], got {tuple(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError(f"{name} has no rows")
    return t.shape[0], _act_dtype(t, name)


def linear(part, fmt, int64_t rows, int64_t cols, x, out, stream=None):
    """out[T, rows] = x[T, cols] @ W.T with W the quantized part [rows, cols] (fp32 accumulation)."""
    cdef int f = _fmt(fmt)
    need = part_nbytes(fmt, rows, cols)
    cdef int dev = _device(x, "x", -1)
    _check_part(part, "part", f, rows, cols, need, dev)
    _device(out, "out", dev)
    T, xd = _act2d(x, "x", cols)
    T2, yd = _act2d(out, "out", rows)
    if T2 != T:
        raise ValueError(f"out has {T2} rows, x has {T}")
    cdef uintptr_t pp = part.data_ptr(), xp = x.data_ptr(), yp = out.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int64_t t = T
    cdef int xdt = xd, ydt = yd, rc
    with nogil:
        rc = fmc_linear(f, <const void *>pp, rows, cols, <const void *>xp, xdt, t, <void *>yp, ydt, dev,
                        <void *>sp)
    _check(rc, "linear")
    return out


cdef int64_t _stacked_parts(parts, fmt, int f, rows, int64_t cols, int dev, uintptr_t *pp,
                            int64_t *rr) except -1:
    """Check the stacked q8/q4 parts [rows[i], cols] on dev into pp/rr (gemv, gemv_norm): their rows in all."""
    cdef int64_t total = 0
    cdef int i
    for i in range(len(parts)):
        r = int(rows[i])
        _check_part(parts[i], f"parts[{i}]", f, r, cols, part_nbytes(fmt, r, cols), dev)
        pp[i] = parts[i].data_ptr()
        rr[i] = r
        total += r
    return total


def gemv(parts, fmt, rows, int64_t cols, x, out, stream=None):
    """out[T, sum(rows)] = x[T, cols] @ [W_0; W_1; ...].T: the parts (uint8 tensors, each a q8/q4 part
    [rows[i], cols]) stacked along the rows in one launch of the decode GEMV; T <= GEMV_MAX_TOKENS,
    x bfloat16/float16."""
    cdef int f = _fmt(fmt)
    if f == FMC_Q2:
        raise ValueError("gemv takes q8 and q4 parts (q2: linear)")
    cdef int n = len(parts)
    if n < 1 or n > FMC_GEMV_MAX_PARTS or len(rows) != n:
        raise ValueError(f"gemv takes 1..{FMC_GEMV_MAX_PARTS} parts with one row count each, got {n} parts, "
                         f"{len(rows)} row counts")
    cdef int dev = _device(x, "x", -1)
    cdef uintptr_t pp[FMC_GEMV_MAX_PARTS]
    cdef int64_t rr[FMC_GEMV_MAX_PARTS]
    total = _stacked_parts(parts, fmt, f, rows, cols, dev, pp, rr)
    _device(out, "out", dev)
    T, xd = _act2d(x, "x", cols)
    T2, yd = _act2d(out, "out", total)
    if T2 != T:
        raise ValueError(f"out has {T2} rows, x has {T}")
    if T > GEMV_MAX_TOKENS or xd == FMC_F32:
        raise ValueError(f"gemv takes 1..{GEMV_MAX_TOKENS} tokens of bfloat16/float16 x, got {T} of {x.dtype}")
    cdef uintptr_t xp = x.data_ptr(), yp = out.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int64_t t = T
    cdef int xdt = xd, ydt = yd, rc
    with nogil:
        rc = fmc_gemv(f, n, <const void *const *>pp, rr, cols, <const void *>xp, xdt, t, <void *>yp, ydt, dev,
                      <void *>sp)
    _check(rc, "gemv")
    return out


cdef _vec(t, name, int64_t n, dtype, int device):
    """Check t is a contiguous CUDA tensor of n values of dtype on device, 16-byte aligned for 16-bit dtypes."""
    _device(t, name, device)
    if t.dtype != dtype or t.numel() != n:
        raise ValueError(f"{name} must hold {n} values of {dtype}, got {t.numel()} of {t.dtype}")
    if dtype != _torch.int64 and t.data_ptr() % 16:
        raise ValueError(f"{name} must start on a 16-byte boundary (data_ptr {t.data_ptr():#x})")


def gemv_norm(parts, fmt, rows, int64_t cols, h, hd, nw, float eps, hs, out, stream=None):
    """out[1, sum(rows)] = x @ [W_0; W_1; ...].T for x = rms_norm(h + hd) * nw (models.layers.rms_norm's
    rounding) computed inside the GEMV's blocks; h + hd also written to hs. h, hd, nw, hs: cols values of
    one bfloat16/float16 dtype; out float32/bfloat16/float16 [1, sum(rows)]."""
    cdef int f = _fmt(fmt)
    if f == FMC_Q2:
        raise ValueError("gemv_norm takes q8 and q4 parts")
    cdef int n = len(parts)
    if n < 1 or n > FMC_GEMV_MAX_PARTS or len(rows) != n:
        raise ValueError(f"gemv_norm takes 1..{FMC_GEMV_MAX_PARTS} parts with one row count each")
    cdef int dev = _device(h, "h", -1)
    xd = _act_dtype(h, "h")
    if xd == FMC_F32:
        raise ValueError("gemv_norm takes bfloat16/float16 activations")
    for t, name in ((h, "h"), (hd, "hd"), (nw, "nw"), (hs, "hs")):
        _vec(t, name, cols, h.dtype, dev)
    cdef uintptr_t pp[FMC_GEMV_MAX_PARTS]
    cdef int64_t rr[FMC_GEMV_MAX_PARTS]
    total = _stacked_parts(parts, fmt, f, rows, cols, dev, pp, rr)
    _device(out, "out", dev)
    T2, yd = _act2d(out, "out", total)
    if T2 != 1:
        raise ValueError(f"out must have one row, got {T2}")
    cdef uintptr_t hp = h.data_ptr(), dp = hd.data_ptr(), wp = nw.data_ptr(), sp_ = hs.data_ptr(), yp = out.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int xdt = xd, ydt = yd, rc
    with nogil:
        rc = fmc_gemv_norm(f, n, <const void *const *>pp, rr, cols, <const void *>hp, <const void *>dp,
                           <const void *>wp, eps, <void *>sp_, xdt, <void *>yp, ydt, dev, <void *>sp)
    _check(rc, "gemv_norm")
    return out


def route(h, o, nw, router, int k, float eps, bint norm_topk, entries, base, int64_t stride, h2, x, weights, ids,
          ids_row, addrs, stream=None):
    """A decode token's routing after attention, one launch: h2 = h + o, x = rms_norm(h2) * nw, the
    router [E, H] logits, softmax, the top k (weights divided by their sum if norm_topk) into weights [k]
    (the activation dtype), ids and ids_row [k] (int64), addrs [k] = base[0] + entries[ids] * stride."""
    cdef int dev = _device(h, "h", -1)
    xd = _act_dtype(h, "h")
    if xd == FMC_F32:
        raise ValueError("route takes bfloat16/float16 activations")
    if router.dim() != 2:
        raise ValueError(f"router must be [E, H], got {tuple(router.shape)}")
    cdef int64_t E = router.shape[0], H = router.shape[1]
    if H % 8 or H > FMC_ROUTE_MAX_H or E > FMC_ROUTE_MAX_E or k < 1 or k > 32 or k > E:
        raise ValueError(f"route takes H % 8 == 0, H <= {FMC_ROUTE_MAX_H}, E <= {FMC_ROUTE_MAX_E}, k <= min(32, E); "
                         f"got H {H}, E {E}, k {k}")
    for t, name in ((h, "h"), (o, "o"), (nw, "nw"), (h2, "h2"), (x, "x")):
        _vec(t, name, H, h.dtype, dev)
    _vec(router, "router", E * H, h.dtype, dev)
    _vec(weights, "weights", k, h.dtype, dev)
    _vec(entries, "entries", E, _torch.int64, dev)
    _vec(base, "base", 1, _torch.int64, dev)
    for t, name in ((ids, "ids"), (ids_row, "ids_row"), (addrs, "addrs")):
        _vec(t, name, k, _torch.int64, dev)
    cdef uintptr_t hp = h.data_ptr(), op = o.data_ptr(), wp = nw.data_ptr(), rp = router.data_ptr()
    cdef uintptr_t ep = entries.data_ptr(), bp = base.data_ptr(), h2p = h2.data_ptr(), xp = x.data_ptr()
    cdef uintptr_t wtp = weights.data_ptr(), ip = ids.data_ptr(), irp = ids_row.data_ptr(), ap = addrs.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int xdt = xd, rc, nt = norm_topk
    with nogil:
        rc = fmc_route(<const void *>hp, <const void *>op, <const void *>wp, <const void *>rp, H, E, k, eps, nt,
                       <const int64_t *>ep, <const int64_t *>bp, stride, <void *>h2p, <void *>xp, <void *>wtp,
                       <int64_t *>ip, <int64_t *>irp, <int64_t *>ap, xdt, dev, <void *>sp)
    _check(rc, "route")


_GEMV_KEYS = {"split": 0, "warps": 1, "pdl": 2, "last_split": 3, "last_warps": 4, "last_grid": 5, "kernel": 6,
              "grid": 7, "last_kernel": 8, "persist": 9}


def gemv_tune(key, value=None):
    """A knob of gemv (process-wide), for benchmarks; returns the previous value. keys: split (warps
    per row pair, 1/2/4/8; 0 = auto, the default), warps (per block, 1..8; 0 = auto: 8), pdl (1, the
    default: programmatic dependent launch on sm_90+), kernel (0 = auto, the default: 1 where its
    blocks fit in one wave, else the persistent grid; 1 = a block per item, 2 / 3 = the persistent
    grid at 2 / 3 blocks per SM), grid (the persistent grid's most blocks; 0 = auto: the blocks
    resident at once), persist (the persistent variant auto takes, 2 or 3; 0 = per format and
    tokens); read-only: last_split, last_warps, last_grid, last_kernel."""
    try:
        k = _GEMV_KEYS[key]
    except KeyError:
        raise ValueError(f"unknown gemv tuning key {key!r}; known: {', '.join(_GEMV_KEYS)}") from None
    return fmc_gemv_tune(k, -1 if value is None else int(value))


def dequant(part, fmt, int64_t rows, int64_t cols, out, stream=None):
    """out[rows, cols] = the dequantized part (as quant.dequantize, rounded to out's dtype)."""
    cdef int f = _fmt(fmt)
    need = part_nbytes(fmt, rows, cols)
    cdef int dev = _device(out, "out", -1)
    _check_part(part, "part", f, rows, cols, need, dev)
    cdef int od = _act_dtype(out, "out")
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"out must have shape ({rows}, {cols}), got {tuple(out.shape)}")
    if out.data_ptr() % 16:
        raise ValueError("out must start on a 16-byte boundary")
    cdef uintptr_t pp = part.data_ptr(), op = out.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int rc
    with nogil:
        rc = fmc_dequant(f, <const void *>pp, rows, cols, <void *>op, od, dev, <void *>sp)
    _check(rc, "dequant")
    return out


def moe(records, layout, weights, x, out, workspace, stream=None, mode="auto"):
    """out[T, H] = sum_e weights[e] * w2_e · (silu(w1_e · x) * (w3_e · x)) over the k records.

    layout = (fmt, hidden, inter, w13_offset, w2_offset, record_nbytes)."""
    fmt, hidden, inter, w13_off, w2_off, rec_nbytes = layout
    cdef int f = _fmt(fmt)
    cdef fmc_layout L
    L.fmt = f
    L.hidden = hidden
    L.inter = inter
    L.w13_off = w13_off
    L.w2_off = w2_off
    n13 = part_nbytes(fmt, 2 * inter, hidden)
    n2 = part_nbytes(fmt, hidden, inter)
    if w13_off < 0 or w2_off < 0 or w13_off + n13 > rec_nbytes or w2_off + n2 > rec_nbytes:
        raise ValueError(f"layout {layout}: parts do not fit in a record of {rec_nbytes} bytes")
    if w13_off % 16 or w2_off % 16:
        raise ValueError(f"layout {layout}: part offsets must be multiples of 16")
    cdef int dev = _device(x, "x", -1)
    _device(out, "out", dev)
    T, xd = _act2d(x, "x", hidden)
    T2, od = _act2d(out, "out", hidden)
    if T2 != T:
        raise ValueError(f"out has {T2} rows, x has {T}")
    try:
        m = _MODES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}") from None

    cdef int k
    cdef int on_dev = 0
    cdef uint64_t *recs = NULL
    cdef uintptr_t recs_dev = 0
    if isinstance(records, _torch.Tensor):
        _device(records, "records", dev)
        if records.dtype != _torch.int64 or records.dim() != 1:
            raise TypeError("records as a tensor must be a 1-D int64 CUDA tensor of record addresses")
        k = records.shape[0]
        on_dev = 1
        recs_dev = records.data_ptr()
    else:
        records = list(records)
        k = len(records)
    if k < 1 or k > FMC_MAX_K:
        raise ValueError(f"between 1 and {FMC_MAX_K} experts per call, got {k}")

    cdef float wh[FMC_MAX_K]
    cdef const float *wh_p = NULL
    cdef uintptr_t wd = 0
    cdef int wdt = FMC_F32
    if weights is not None:
        if isinstance(weights, _torch.Tensor) and weights.is_cuda:
            _device(weights, "weights", dev)
            wdt = _act_dtype(weights, "weights")
            if weights.numel() != k:
                raise ValueError(f"weights has {weights.numel()} values for {k} experts")
            wd = weights.data_ptr()
        else:
            vals = weights.tolist() if isinstance(weights, _torch.Tensor) else list(weights)
            vals = [float(v) for v in (vals if isinstance(vals, list) else [vals])]
            if len(vals) != k:
                raise ValueError(f"weights has {len(vals)} values for {k} experts")
            for i in range(k):
                wh[i] = vals[i]
            wh_p = wh

    _device(workspace, "workspace", dev)
    if workspace.dtype != _torch.uint8:
        raise TypeError("workspace must be a uint8 tensor")
    cdef size_t wsb = workspace.numel()
    if wsb < fmc_moe_workspace_bytes(k, inter):
        raise ValueError(f"workspace holds {wsb} bytes, needs {fmc_moe_workspace_bytes(k, inter)} "
                         f"(workspace_bytes(k, inter)); its first 256 bytes must start zeroed")

    cdef uintptr_t xp = x.data_ptr(), yp = out.data_ptr(), wsp = workspace.data_ptr()
    cdef uintptr_t sp = _stream(stream, dev)
    cdef int64_t t = T
    cdef int xdt = xd, odt = od, mm = m, rc
    recs = <uint64_t *>malloc(k * sizeof(uint64_t))
    if recs == NULL:
        raise MemoryError()
    try:
        if on_dev:
            pass
        else:
            for i in range(k):
                _check_part(records[i], f"records[{i}]", f, 0, 0, rec_nbytes, dev)
                recs[i] = <uint64_t>records[i].data_ptr()
        with nogil:
            if on_dev:
                rc = fmc_moe(&L, k, <const uint64_t *>recs_dev, 1, <const void *>wd, wdt, wh_p,
                             <const void *>xp, xdt, t, <void *>yp, odt, <void *>wsp, wsb, mm, dev, <void *>sp)
            else:
                rc = fmc_moe(&L, k, recs, 0, <const void *>wd, wdt, wh_p,
                             <const void *>xp, xdt, t, <void *>yp, odt, <void *>wsp, wsb, mm, dev, <void *>sp)
    finally:
        free(recs)
    _check(rc, "moe")
    return out
