"""llama.cpp's quantized matmul numerics in our GGUF kernels (act="q8", the CPU default), held to
llama.cpp's own CPU code: libggml-cpu from llama-cpp-python, through ctypes (ggml_cpu.py).

- The activation rows we quantize equal ggml's from_float for the weight type's vec_dot_type
  (Q8_0 / Q8_1 / Q8_K) bit for bit: the quants, the fp16 (Q8_0/Q8_1) or fp32 (Q8_K) scales, Q8_1's
  sums and Q8_K's bsums, including round-half-to-even ties and all-zero blocks.
- linear() equals ggml's vec_dot per row up to float summation order (measured ~2e-7 of the
  largest output; the fp32-activation path is ~5e-3 away, so the tolerance separates them).
- The fused MoE equals ggml's matmuls composed with ggml's silu (its own expf, ported)."""
import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
kernels = pytest.importorskip("flashmoe_plugin._gguf_kernels", reason="native GGUF kernels not built")
import ggml_cpu  # noqa: E402
from gguf_oracles import gguf_layout, random_part  # noqa: E402

from flashmoe_plugin import quant_gguf  # noqa: E402

BLOCK = sorted(quant_gguf.BLOCK_FORMATS)  # MXFP4 too: Q8_0 activations, as llama.cpp
TOL = 2e-6  # of the largest |y|: float summation order only


@pytest.fixture(scope="module", autouse=True)
def ggml():
    try:
        return ggml_cpu.library()
    except (ImportError, OSError) as e:
        pytest.skip(f"llama-cpp-python's libggml-cpu not loadable: {e}")


def tid(fmt):
    return quant_gguf.BLOCK_FORMATS[fmt][0]


def activations(T, n, seed=0):
    """Random rows with the awkward cases: a block of exact .5 ties (amax 127 makes the scale 1),
    an all-zero block, one whose largest |x| is negative and one with +max and -max both."""
    x = torch.randn(T, n, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :32] = torch.arange(-15.5, 16.5, 1.0)
    x[0, 31] = 127.0
    x[0, 32:64] = 0.0
    if n >= 512:
        x[0, 256:512] = torch.linspace(-2, 1, 256)
        x[-1, 256:512] = torch.linspace(-1, 1, 256)
    return x


def decode_ggml(vt, blocks, n):
    """ggml's activation blocks -> (q, d, s, bsum) as our quantize_activations returns them."""
    T = blocks.shape[0]
    d = np.zeros((T, n // 32), np.float32)
    s = np.zeros((T, n // 32), np.float32)
    bsum = np.zeros((T, n // 16), np.int32)
    if vt == 15:  # block_q8_K: float d, int8 qs[256], int16 bsums[16]
        b = blocks.reshape(T, n // 256, 292)
        d[:, :n // 256] = b[..., :4].copy().view(np.float32)[..., 0]
        q = b[..., 4:260].copy().view(np.int8).reshape(T, n)
        bsum[:] = b[..., 260:].copy().view(np.int16).reshape(T, n // 16)
    else:  # block_q8_0: half d, int8 qs[32]; block_q8_1: half d, half s, int8 qs[32]
        size = 34 if vt == 8 else 36
        b = blocks.reshape(T, n // 32, size)
        d[:] = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if vt == 9:
            s[:] = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        q = b[..., size - 32:].copy().view(np.int8).reshape(T, n)
    return q, d, s, bsum


@pytest.mark.parametrize("fmt", BLOCK)
def test_activation_quantization_is_ggmls_bit_for_bit(fmt):
    n = 1024
    x = activations(4, n)
    vt, blocks = ggml_cpu.quantize_activations(tid(fmt), x.numpy())
    ours = [t.numpy() for t in kernels.quantize_activations(x, fmt)]
    for name, a, b in zip(("q", "d", "s", "bsum"), ours, decode_ggml(vt, blocks, n)):
        assert np.array_equal(a.view(np.uint8) if a.dtype == np.int8 else a, b.view(np.uint8) if b.dtype == np.int8
                              else b), f"{fmt}: {name} differs from ggml's (vec_dot_type {vt})"


@pytest.mark.parametrize("fmt", BLOCK)
@pytest.mark.parametrize("T", [1, 6])
def test_linear_equals_ggml_vec_dot(fmt, T):
    rows, cols = 24, 512
    part = random_part(fmt, rows, cols, seed=3)
    x = activations(T, cols, seed=T)
    ref = ggml_cpu.linear(tid(fmt), part.numpy(), rows, x.numpy())
    scale = np.abs(ref).max()
    ours = kernels.linear(x, part, fmt, (rows, cols)).numpy()
    assert np.abs(ours - ref).max() <= TOL * scale, f"{fmt}: {np.abs(ours - ref).max() / scale:.2e}"
    f32 = kernels.linear(x, part, fmt, (rows, cols), act="f32").numpy()
    assert np.abs(f32 - ref).max() > 100 * TOL * scale  # the tolerance tells the two numerics apart


@pytest.mark.parametrize("f13,f2", [("q4_k", "q6_k"), ("q4_0", "q4_0"), ("q8_0", "q5_1")])
def test_moe_equals_ggml_matmuls_and_silu(f13, f2):
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    H, I, T = 256, 256, 3
    lay = gguf_layout(f13, f2, H, I)
    recs, ref = [], np.zeros((T, H), np.float32)
    x = activations(T, H, seed=7) / 16  # a power of two: the ties stay ties, silu stays finite
    w = [0.6, 0.4]
    for e in range(2):
        w13, w2 = random_part(f13, 2 * I, H, seed=30 + e), random_part(f2, H, I, seed=40 + e)
        rec = torch.zeros(lay.size, dtype=torch.uint8)
        rec[:lay.part("w13").nbytes] = w13
        p2 = lay.part("w2")
        rec[p2.offset:p2.offset + p2.nbytes] = w2
        recs.append(rec)
        gu = ggml_cpu.linear(tid(f13), w13.numpy(), 2 * I, x.numpy())
        h = ggml_cpu.silu(gu[:, :I]) * gu[:, I:]
        ref += np.float32(w[e]) * ggml_cpu.linear(tid(f2), w2.numpy(), H, h)
    ours = CpuBackend(gguf_act="q8").moe(x, recs, torch.tensor(w), lay).numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()


def test_silu_port_is_close_to_silu():
    """A sanity bound on the test's numpy port of ggml's silu (ggml's expf is within ~1.5 ulp).
    Its exactness was checked once against llama.cpp itself: 512 of 512 values equal to the
    `ffn_moe_swiglu-0` tensor llama.cpp computed on the Mixtral Q4_0 oracle model (read with an
    eval callback), where libm's expf gave 146 different values."""
    g = np.array([-3.1, -0.7, 0.0, 0.3, 2.2, 9.5, -95.0, 88.0], np.float32)
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64)))
    assert np.allclose(ggml_cpu.silu(g), exact, rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("fmt", BLOCK)
def test_integer_dot_twins_agree_bit_for_bit(fmt, isa):
    # 3 AVX-512 steps of 256, and for the 32-element blocks a tail of 128 (the AVX2 loop's step)
    rows, cols = 16, 768 if fmt in ("q4_k", "q5_k", "q6_k") else 896
    part = random_part(fmt, rows, cols, seed=9)
    x = activations(3, cols, seed=9)
    try:
        kernels.set_q8_isa(isa)
    except ValueError:
        pytest.skip(f"no {isa} on this CPU: the portable integer dot checks itself only")
    try:
        fast = kernels.linear(x, part, fmt, (rows, cols))
        kernels.set_q8_isa("portable")
        slow = kernels.linear(x, part, fmt, (rows, cols))
    finally:
        kernels.set_q8_isa(None)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32)), fmt


def test_f32_weights_keep_fp32_activations():
    with pytest.raises(ValueError, match="fp32 activations"):
        kernels.quantize_activations(torch.randn(1, 64), "f32")
