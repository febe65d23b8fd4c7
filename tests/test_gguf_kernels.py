"""llama.cpp's block formats in our kernels: dequantization bit for bit against gguf-py's
gguf.quants.dequantize (the format's reference), fused GEMV/GEMM and the expert FFN with fp32
activations (act="f32") against dequantize-then-torch. The default, llama.cpp's quantized
activations, is held to libggml-cpu itself in test_gguf_q8.py."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from flashmoe_plugin import quant, quant_gguf  # noqa: E402
from flashmoe_plugin.kernels.torch_backend import TorchBackend  # noqa: E402

kernels = pytest.importorskip("flashmoe_plugin._gguf_kernels", reason="native GGUF kernels not built")
from gguf_oracles import gguf_layout, random_part  # noqa: E402

BLOCK = sorted(quant_gguf.BLOCK_FORMATS)
def reference(part, fmt, rows, cols):
    tid = quant_gguf.BLOCK_FORMATS[fmt][0]
    return torch.from_numpy(gguf_dequantize(part.numpy().reshape(rows, -1), gguf.GGMLQuantizationType(tid)).copy())


@pytest.mark.parametrize("fmt", BLOCK)
def test_dequantize_bit_exact(fmt):
    rows, cols = 9, 768
    part = random_part(fmt, rows, cols)
    ref = reference(part, fmt, rows, cols)
    ours = kernels.dequantize(part, fmt, (rows, cols))
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), fmt
    # the torch reference backend goes through the same definition
    assert torch.equal(quant.dequantize(part, fmt, (rows, cols)), ref)


def test_mxfp4_every_exponent_bit_exact():
    """MXFP4's e8m0 scale byte over all 256 values (subnormal halves at 0 and 1; 2^127 at 255, which overflows to inf in both)
    with every code in both nibbles."""
    g = np.random.default_rng(5)
    raw = g.integers(0, 256, (256, 17), dtype=np.uint8)
    raw[:, 0] = np.arange(256)
    raw[:16, 1:] = (np.arange(16)[:, None] * 17).astype(np.uint8)  # both nibbles = each code
    part = torch.from_numpy(raw.reshape(-1).copy())
    with np.errstate(over="ignore"):
        ref = reference(part, "mxfp4", 8, 1024)
    assert torch.equal(kernels.dequantize(part, "mxfp4", (8, 1024)).view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16"])
def test_dequantize_raw_types(fmt):
    w = torch.randn(5, 64)
    raw = w.to(quant.RAW_DTYPES[fmt]).contiguous().view(-1).view(torch.uint8)
    assert torch.equal(kernels.dequantize(raw, fmt, (5, 64)), w.to(quant.RAW_DTYPES[fmt]).float())


@pytest.mark.parametrize("fmt", BLOCK)
@pytest.mark.parametrize("T", [1, 5])
def test_linear_matches_dequantize_then_matmul(fmt, T):
    rows, cols = 40, 512
    part = random_part(fmt, rows, cols, seed=1)
    x = torch.randn(T, cols)
    ref = x.double() @ reference(part, fmt, rows, cols).double().T
    torch.testing.assert_close(kernels.linear(x, part, fmt, (rows, cols), act="f32").double(), ref, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("f13,f2", [("q4_k", "q6_k"), ("q8_0", "q8_0"), ("q4_0", "q4_1"), ("q5_k", "q5_k")])
@pytest.mark.parametrize("T", [1, 3])
def test_expert_ffn_matches_torch(f13, f2, T):
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    H, I = 256, 512
    lay = gguf_layout(f13, f2, H, I)
    recs = []
    for s in range(3):
        rec = torch.zeros(lay.size, dtype=torch.uint8)
        rec[:lay.part("w13").nbytes] = random_part(f13, 2 * I, H, seed=10 + s)
        p2 = lay.part("w2")
        rec[p2.offset:p2.offset + p2.nbytes] = random_part(f2, H, I, seed=20 + s)
        recs.append(rec)
    x = torch.randn(T, H)
    w = torch.tensor([0.5, 0.3, 0.2])
    ref = sum(wi * TorchBackend().expert_ffn(x, r, lay) for wi, r in zip(w.tolist(), recs))
    cpu = CpuBackend(gguf_act="f32")
    ours = cpu.moe(x, recs, w, lay)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_bad_arguments_are_clear_errors():
    part = random_part("q4_0", 2, 64)
    with pytest.raises(ValueError, match="q4_0"):
        kernels.dequantize(part, "q4_0", (2, 48))  # not whole blocks
    with pytest.raises(ValueError, match="holds"):
        kernels.dequantize(part[:10], "q4_0", (2, 64))
    with pytest.raises(ValueError, match="unknown GGUF block format 'q3_k'"):
        kernels.dequantize(part, "q3_k", (2, 64))
    with pytest.raises(ValueError, match="unknown activation mode 'q4'"):
        kernels.linear(torch.randn(1, 64), part, "q4_0", (2, 64), act="q4")


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no NVIDIA GPU visible to torch (the CUDA twins are checked on the GPU machine)")
    try:
        from flashmoe_plugin import _gguf_kernels_cuda
    except ImportError as e:
        pytest.skip(f"flashmoe_plugin._gguf_kernels_cuda not built (no nvcc at install time): {e}")
    return _gguf_kernels_cuda


@pytest.mark.parametrize("fmt", BLOCK + ["f32", "f16", "bf16"])
def test_cuda_dequantize_bit_exact(fmt):
    kc = _cuda()
    rows, cols = 33, 1024
    if fmt in quant.RAW_DTYPES:
        part = torch.randn(rows, cols).to(quant.RAW_DTYPES[fmt]).view(-1).view(torch.uint8)
        ref = part.view(quant.RAW_DTYPES[fmt]).float().view(rows, cols)
    else:
        part = random_part(fmt, rows, cols, seed=5)
        ref = reference(part, fmt, rows, cols)
    got = kc.dequantize(part.cuda(), fmt, (rows, cols)).cpu()
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), fmt


def test_cuda_expert_ffn_matches_cpu():
    _cuda()
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    H, I = 256, 512
    lay = gguf_layout("q4_k", "q6_k", H, I)
    rec = torch.zeros(lay.size, dtype=torch.uint8)
    rec[:lay.part("w13").nbytes] = random_part("q4_k", 2 * I, H, seed=1)
    p2 = lay.part("w2")
    rec[p2.offset:p2.offset + p2.nbytes] = random_part("q6_k", H, I, seed=2)
    x = torch.randn(5, H)
    ref = CpuBackend(gguf_act="f32").expert_ffn(x, rec, lay)  # the CUDA kernels take fp32 activations
    got = CudaBackend().expert_ffn(x.cuda(), rec.cuda(), lay).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
