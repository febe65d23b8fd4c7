"""The CUDA kernels (flashmoe_plugin._kernels_cuda) against quant.dequantize + float64 torch math.

Tolerances, relative (||out - ref|| / ||ref||, every output element also finite and written):
  float32 activations: 1e-5 (the kernels keep x to ~2^-31 of its group maximum, fp32 accumulation)
  bf16 / f16 activations: 8e-3 (the output is rounded to bf16, 2^-9 per element; x itself is kept
  to 2^-16 of its group maximum)
Without a GPU or without the compiled module the GPU tests skip; the backend's availability
check runs everywhere.
"""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin import quant
from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout


def _skip_reason():
    if not torch.cuda.is_available():
        return "the CUDA kernels are not tested: no NVIDIA GPU is visible to torch on this machine"
    try:
        import flashmoe_plugin._kernels_cuda  # noqa: F401
    except ImportError:
        return ("the CUDA kernels are not tested: flashmoe_plugin._kernels_cuda is not built (no nvcc at install, "
                "or FLASHMOE_CUDA=0)")
    return None


REASON = _skip_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=REASON or "")
gpu = [pytest.mark.cuda, needs_gpu]

FORMATS = ("q8", "q4", "q2")
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 8e-3}


def K():
    import flashmoe_plugin._kernels_cuda as k
    return k


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite (unwritten?) output elements"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def fill_part(buf: torch.Tensor, fmt: str, shape, gen: torch.Generator) -> None:
    """Random packed weights with sane fp16 scales/biases, written into a uint8 CPU buffer."""
    n = quant.part_nbytes(fmt, shape)
    buf[:n] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    v = quant.views(buf[:n], fmt, shape)
    rows, cols = shape
    v["scales"].copy_(((torch.rand(rows, cols // 64, generator=gen) + 0.05) * 0.02).half())
    if "biases" in v:
        v["biases"].copy_((torch.randn(rows, cols // 64, generator=gen) * 0.05).half())


def rand_part(fmt, shape, gen):
    buf = torch.zeros(quant.part_nbytes(fmt, shape), dtype=torch.uint8)
    fill_part(buf, fmt, shape, gen)
    return buf


def rand_record(layout: RecordLayout, gen) -> torch.Tensor:
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for p in layout.parts:
        fill_part(rec[p.offset:p.offset + p.nbytes], p.format, p.shape, gen)
    return rec


def ref_expert(x: torch.Tensor, rec: torch.Tensor, layout: RecordLayout) -> torch.Tensor:
    """float64 reference of one expert on CPU."""
    w13 = quant.dequantize(layout.part_bytes(rec, "w13"), layout.format, layout.part("w13").shape).double()
    w2 = quant.dequantize(layout.part_bytes(rec, "w2"), layout.format, layout.part("w2").shape).double()
    gate, up = (x.double() @ w13.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w2.T


def stream():
    return torch.cuda.current_stream().cuda_stream


# --------------------------------------------------------------------------- everywhere

def test_backend_available_never_crashes():
    ok, why = CudaBackend().available()
    assert isinstance(ok, bool) and isinstance(why, str)
    if REASON is not None:
        assert not ok and why
    if REASON == "flashmoe_plugin._kernels_cuda not built":
        assert "not built" in why


# --------------------------------------------------------------------------- GEMV / small batches

LINEAR_SHAPES = [(1, 64), (3, 64), (37, 192), (130, 320), (257, 1024), (64, 4160)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_linear(fmt, dtype):
    gen = torch.Generator().manual_seed(1)
    for (n, k) in LINEAR_SHAPES:
        part = rand_part(fmt, (n, k), gen)
        w = quant.dequantize(part, fmt, (n, k)).double()
        dpart = part.cuda()
        for T in (1, 3, 6):
            x = torch.randn(T, k, generator=gen).to(dtype)
            ref = x.double() @ w.T
            out = torch.full((T, n), float("nan"), dtype=dtype, device="cuda")
            K().linear(dpart, fmt, n, k, x.cuda(), out, stream())
            err = rel_err(out, ref)
            assert err <= TOL[dtype], f"{fmt} {dtype} N={n} K={k} T={T}: rel err {err:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_linear_vector_input_and_f32_out_from_bf16(fmt):
    gen = torch.Generator().manual_seed(2)
    n, k = 96, 256
    part = rand_part(fmt, (n, k), gen)
    w = quant.dequantize(part, fmt, (n, k)).double()
    x = torch.randn(k, generator=gen).bfloat16()
    out = torch.full((1, n), float("nan"), device="cuda")
    K().linear(part.cuda(), fmt, n, k, x.cuda(), out)
    # bf16 input, fp32 output: only x's 16-bit fixed point remains (~1e-4 relative at most)
    assert rel_err(out[0], w @ x.double()) <= 1e-3


# --------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_dequant_is_bit_exact(fmt):
    gen = torch.Generator().manual_seed(3)
    for (n, k) in [(1, 64), (37, 192), (130, 4160)]:
        part = rand_part(fmt, (n, k), gen)
        ref = quant.dequantize(part, fmt, (n, k))
        dpart = part.cuda()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
            K().dequant(dpart, fmt, n, k, out)
            assert torch.equal(out.cpu(), ref.to(dtype)), f"{fmt} {dtype} ({n}, {k})"


# --------------------------------------------------------------------------- fused experts

MOE_SHAPES = [(64, 64), (192, 128), (256, 320), (1024, 192)]


def _weights(kind, k, gen):
    w = torch.rand(k, generator=gen) + 0.1
    if kind == "none":
        return None, torch.ones(k)
    if kind == "host":
        return w.tolist(), w
    if kind == "f32":
        return w.cuda(), w
    wb = w.bfloat16()
    return wb.cuda(), wb.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_moe(fmt, dtype):
    gen = torch.Generator().manual_seed(4)
    case = 0
    for (H, I) in MOE_SHAPES:
        layout = RecordLayout.build(fmt, H, I)
        recs = [rand_record(layout, gen) for _ in range(5)]
        drecs = [r.cuda() for r in recs]
        lt = CudaBackend.layout_tuple(layout)
        for k in (1, 2, 5):
            for T in (1, 3, 5):
                mode = ("auto", "coop", "two")[case % 3]
                wkind = ("none", "host", "f32", "bf16")[case % 4]
                case += 1
                w_arg, w_ref = _weights(wkind, k, gen)
                x = torch.randn(T, H, generator=gen).to(dtype)
                ref = sum(float(w_ref[e]) * ref_expert(x, recs[e], layout) for e in range(k))
                out = torch.full((T, H), float("nan"), dtype=dtype, device="cuda")
                ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
                K().moe(drecs[:k], lt, w_arg, x.cuda(), out, ws, stream(), mode=mode)
                err = rel_err(out, ref)
                assert err <= TOL[dtype], (f"{fmt} {dtype} H={H} I={I} k={k} T={T} mode={mode} "
                                           f"weights={wkind}: rel err {err:.3g}")


@pytest.mark.cuda
@needs_gpu
def test_moe_records_as_device_addresses_and_repeated_barrier():
    gen = torch.Generator().manual_seed(5)
    layout = RecordLayout.build("q4", 256, 128)
    recs = [rand_record(layout, gen) for _ in range(3)]
    drecs = [r.cuda() for r in recs]
    addrs = torch.tensor([r.data_ptr() for r in drecs], dtype=torch.int64, device="cuda")
    w = torch.tensor([0.5, 0.3, 0.2])
    ws = torch.zeros(K().workspace_bytes(3, 128), dtype=torch.uint8, device="cuda")
    lt = CudaBackend.layout_tuple(layout)
    xs = [torch.randn(1, 256, generator=gen) for _ in range(4)]
    outs = []
    for i in range(200):  # many cooperative launches reuse one barrier
        out = torch.empty(1, 256, device="cuda")
        K().moe(addrs, lt, w.cuda(), xs[i % 4].cuda(), out, ws, stream(), mode="coop")
        if i >= 196:
            outs.append(out)
    for x, out in zip(xs, outs):
        ref = sum(float(w[e]) * ref_expert(x, recs[e], layout) for e in range(3))
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_moe_qwen35_layer_shape(fmt):
    """A whole Qwen3.5-397B-shaped layer (H 4096, I 1024, 4 experts): real grid sizes."""
    gen = torch.Generator().manual_seed(6)
    layout = RecordLayout.build(fmt, 4096, 1024)
    recs = [rand_record(layout, gen).cuda() for _ in range(4)]
    w = torch.softmax(torch.randn(4, generator=gen), 0)
    x32 = torch.randn(1, 4096, generator=gen)
    ws13 = [quant.dequantize(layout.part_bytes(r, "w13"), fmt, layout.part("w13").shape).double() for r in recs]
    ws2 = [quant.dequantize(layout.part_bytes(r, "w2"), fmt, layout.part("w2").shape).double() for r in recs]
    lt = CudaBackend.layout_tuple(layout)
    ws = torch.zeros(K().workspace_bytes(4, 1024), dtype=torch.uint8, device="cuda")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
        x = x32.to(dtype).cuda()  # the reference sees the same (rounded) input
        ref = torch.zeros(1, 4096, dtype=torch.float64, device="cuda")
        for e in range(4):
            gate, up = (x.double() @ ws13[e].T).chunk(2, dim=-1)
            ref += float(w[e]) * ((torch.nn.functional.silu(gate) * up) @ ws2[e].T)
        outs = {}
        for mode in ("coop", "two"):
            out = torch.full((1, 4096), float("nan"), dtype=dtype, device="cuda")
            K().moe(recs, lt, w.cuda(), x, out, ws, stream(), mode=mode)
            err = rel_err(out, ref)
            assert err <= tol, f"{fmt} {mode} {dtype}: rel err {err:.3g}"
            outs[mode] = out
        try:  # mode "auto" runs what the auto_mode knob names, bit for bit
            for knob, mode in ((1, "two"), (0, "coop")):
                K().tune("auto_mode", knob)
                out = torch.full((1, 4096), float("nan"), dtype=dtype, device="cuda")
                K().moe(recs, lt, w.cuda(), x, out, ws, stream(), mode="auto")
                assert torch.equal(out, outs[mode]), f"{fmt} {dtype}: auto with auto_mode {knob}"
        finally:
            K().tune("auto_mode", 0)


# --------------------------------------------------------------------------- the backend

@pytest.mark.parametrize("fmt", FORMATS + ("bf16",))
@pytest.mark.cuda
@needs_gpu
def test_backend_matches_torch_backend(fmt):
    from flashmoe_plugin.kernels.torch_backend import TorchBackend

    gen = torch.Generator().manual_seed(7)
    H, I = 256, 192
    layout = RecordLayout.build(fmt, H, I)
    if fmt == "bf16":
        rec = torch.zeros(layout.size, dtype=torch.uint8)
        for p in layout.parts:
            rec[p.offset:p.offset + p.nbytes] = quant.quantize(torch.randn(p.shape, generator=gen) * 0.05, "bf16")
    else:
        rec = rand_record(layout, gen)
    drec = rec.cuda()
    be, tb = CudaBackend(), TorchBackend()
    for T in (1, 4, 40):
        x = torch.randn(T, H, generator=gen, device="cpu").cuda()
        ref = tb.expert_ffn(x.double(), drec, layout)
        assert rel_err(be.expert_ffn(x, drec, layout), ref) <= 1e-5, f"T={T}"
    be.fused_max_tokens = 2  # force the dequantize + cuBLAS path (fp32 matmuls may use TF32: looser)
    x = torch.randn(9, H, generator=gen).cuda()
    assert rel_err(be.expert_ffn(x, drec, layout), tb.expert_ffn(x.double(), drec, layout)) <= 2e-3
    recs = [drec, rand_record(layout, gen).cuda() if fmt != "bf16" else drec]
    w = torch.tensor([0.7, 0.3], device="cuda")
    x = torch.randn(1, H, generator=gen).cuda()
    ref = tb.moe_decode(x.double(), recs, w.double(), layout)
    assert rel_err(be.moe_decode(x, recs, w, layout), ref) <= 1e-5


# --------------------------------------------------------------------------- clear errors

@pytest.mark.cuda
@needs_gpu
def test_bad_arguments_raise_clear_errors():
    k = K()
    gen = torch.Generator().manual_seed(8)
    part = rand_part("q4", (8, 128), gen).cuda()
    x = torch.randn(1, 128, device="cuda")
    y = torch.empty(1, 8, device="cuda")
    with pytest.raises(ValueError, match="unsupported weight format"):
        k.linear(part, "q3", 8, 128, x, y)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        k.linear(part, "q4", 8, 128, x.to(torch.int32), y)
    with pytest.raises(ValueError, match="CUDA device"):
        k.linear(part, "q4", 8, 128, x.cpu(), y)
    with pytest.raises(ValueError, match="bytes, the part needs"):
        k.linear(part[:100], "q4", 8, 128, x, y)
    with pytest.raises(ValueError, match="16-byte boundary"):
        k.linear(torch.zeros(part.numel() + 16, dtype=torch.uint8, device="cuda")[1:], "q4", 8, 128, x, y)
    with pytest.raises(ValueError, match="shape"):
        k.linear(part, "q4", 8, 128, torch.randn(1, 64, device="cuda"), y)
    with pytest.raises(ValueError, match="contiguous"):
        k.linear(part, "q4", 8, 128, torch.randn(128, 2, device="cuda").T, torch.empty(2, 8, device="cuda"))
    with pytest.raises(ValueError, match="multiple of 64"):
        k.linear(part, "q4", 8, 100, torch.randn(1, 100, device="cuda"), y)
    layout = RecordLayout.build("q4", 128, 64)
    rec = rand_record(layout, gen).cuda()
    lt = CudaBackend.layout_tuple(layout)
    ws = torch.zeros(k.workspace_bytes(2, 64), dtype=torch.uint8, device="cuda")
    out = torch.empty(1, 128, device="cuda")
    with pytest.raises(ValueError, match="between 1 and"):
        k.moe([], lt, None, x, out, ws)
    with pytest.raises(ValueError, match="workspace"):
        k.moe([rec, rec], lt, None, x, out, ws[:10])
    with pytest.raises(ValueError, match="bytes, the part needs"):
        k.moe([rec[:1000]], lt, None, x, out, ws)
    with pytest.raises(ValueError, match="weights has"):
        k.moe([rec], lt, [0.5, 0.5], x, out, ws)
    with pytest.raises(ValueError, match="mode"):
        k.moe([rec], lt, None, x, out, ws, mode="fast")
