"""llama.cpp's own CPU kernels as an oracle: libggml-cpu from the installed llama-cpp-python, through
ctypes (ggml_get_type_traits_cpu: each type's from_float, vec_dot and vec_dot_type). This is the
code llama.cpp runs for a quantized matmul: the activation row quantized by from_float of the
weight type's vec_dot_type (Q8_0 / Q8_1 / Q8_K), then vec_dot per weight row."""
from __future__ import annotations

import ctypes
import os

import numpy as np

# vec_dot_type id -> (elements, bytes) per block: Q8_0, Q8_1, Q8_K
ACT_BLOCKS = {8: (32, 34), 9: (32, 36), 15: (256, 292)}


class _Traits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_lib = None


def library():
    """The loaded libggml-cpu; raises OSError if llama-cpp-python ships none."""
    global _lib
    if _lib is None:
        import llama_cpp
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        lib.ggml_cpu_init()
        _lib = lib
    return _lib


def _traits(type_id: int) -> _Traits:
    return library().ggml_get_type_traits_cpu(type_id).contents


def quantize_activations(type_id: int, x: np.ndarray) -> tuple[int, np.ndarray]:
    """(vec_dot_type, its blocks [T, bytes]) for activation rows x [T, n] (float32)."""
    vt = _traits(type_id).vec_dot_type
    blk, size = ACT_BLOCKS[vt]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // blk * size), np.uint8)
    f = _FROM(_traits(vt).from_float)
    for t in range(x.shape[0]):
        f(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
    return vt, out


def linear(type_id: int, weight: np.ndarray, rows: int, x: np.ndarray) -> np.ndarray:
    """y [T, rows] = llama.cpp's quantized matmul of W (rows of blocks, as in the file) and x [T, n]."""
    _, qa = quantize_activations(type_id, x)
    dot = _DOT(_traits(type_id).vec_dot)
    w = np.ascontiguousarray(weight).reshape(rows, -1)
    y = np.zeros((x.shape[0], rows), np.float32)
    s = ctypes.c_float()
    for t in range(x.shape[0]):
        for r in range(rows):
            dot(x.shape[1], ctypes.byref(s), 0, w[r].ctypes.data, 0, qa[t].ctypes.data, 0, 1)
            y[t, r] = s.value
    return y


def silu(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's silu (vec.h ggml_v_silu with its AVX-512 ggml_v_expf), lane by lane in numpy:
    fma through float64 (exact products of floats, one rounding of the sum in the cases met)."""
    f = np.float32

    def fma(a, b, c):
        return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)

    def h(s):
        return f(float.fromhex(s))
    x = np.asarray(x, dtype=np.float32)
    m = (f(0) - x).astype(np.float32)
    r = h("0x1.8p23")
    n = (fma(m, h("0x1.715476p+0"), r) - r).astype(np.float32)
    b = fma(-n, h("0x1.7f7d1cp-20"), fma(-n, h("0x1.62e4p-1"), m))
    u = (b * b).astype(np.float32)
    j = fma(fma(fma(h("0x1.0e4020p-7"), b, h("0x1.573e2ep-5")), u, fma(h("0x1.555e66p-3"), b, h("0x1.fffdb6p-2"))),
            u, fma(h("0x1.ffffecp-1"), b, f(1)))
    with np.errstate(over="ignore"):
        e = np.ldexp(j, n.astype(np.int32)).astype(np.float32)
    e = np.where(np.abs(n) > 192, np.where(n <= 0, f(0), f(np.inf)), e).astype(np.float32)
    return (x / (f(1) + e)).astype(np.float32)
