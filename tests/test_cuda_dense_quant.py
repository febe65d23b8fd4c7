"""The dense part held packed on the GPU (runtime/dense_quant.py, CudaBackend.linear): the fused
q8/q4 GEMV kernel (and dequantize + cuBLAS above fused_max_tokens tokens), a GGUF's blocks
through our bit-exact dequantize kernel then cuBLAS, inside the graph-captured decode.

Oracles: the reference dequantization + F.linear (float64 for the products), the same engine run
eagerly (decode_graph="eager": same kernels, so the captured graph must be torch.equal to it),
and the CPU engine with the same dense_quant (the GPU tests' tolerance). Skipped without a GPU
or without the compiled CUDA modules (CI has neither); the CPU twins are tests/test_dense_quant.py."""
import pytest
import torch
import torch.nn.functional as F
from conftest import run_sequence

from flashmoe_plugin import kernels, quant
from flashmoe_plugin.kernels.packed import PackedStack, PackedWeight
from flashmoe_plugin.runtime.engine import Engine


def _skip_reason():
    if not torch.cuda.is_available():
        return "packed dense weights on CUDA are not tested: no NVIDIA GPU is visible to torch on this machine"
    try:
        import flashmoe_plugin._gguf_kernels_cuda  # noqa: F401
        import flashmoe_plugin._kernels_cuda  # noqa: F401,I001
    except ImportError:
        return "packed dense weights on CUDA are not tested: the CUDA modules are not built (no nvcc, or FLASHMOE_CUDA=0)"
    return None


REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.mark.parametrize("fmt", ["q8", "q4", "q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_on_the_gpu_equals_the_reference(fmt, dtype):
    be = kernels.select("cuda")
    rows, cols = 384, 1024
    g = torch.Generator().manual_seed(2)
    if fmt in quant.FORMATS:
        part = quant.quantize(torch.randn(rows, cols, generator=g) * 0.05, fmt)
    else:
        import gguf_oracles as G
        pytest.importorskip("gguf")
        part = G.random_part(fmt, rows, cols, seed=3)
    ref = quant.dequantize(part, fmt, (rows, cols)).double()
    w = PackedWeight(part.cuda(), fmt, (rows, cols), be, dtype)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for T in (1, 3, be.fused_max_tokens + 5):  # fused GEMV, and dequantize + cuBLAS
        x = torch.randn(T, cols, generator=g)
        want = F.linear(x.double(), ref)
        got = w.linear(x.to("cuda", dtype)).double().cpu()
        assert torch.isfinite(got).all()
        assert (got - want).norm() / want.norm() < tol, (fmt, dtype, T)
    ids = torch.tensor([0, 17, 383])
    torch.testing.assert_close(w.rows(ids.cuda()).float().cpu(), ref[ids].float().to(dtype).float(), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_graph_decode_with_packed_dense_equals_eager_and_the_cpu(oracles, mode):
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(17)
    ids, steps = torch.randint(3, 384, (16,), generator=g).tolist(), torch.randint(3, 384, (10,), generator=g).tolist()
    cpu = Engine(store, prefetch="off", decode_graph="off", dense_quant=mode)
    ref = run_sequence(cpu, ids, steps)
    size, total, k = cpu.pager.record_size, cpu.pager.capacity, cpu.config.top_k
    cpu.close()
    for budget in (total, k):  # every expert fits / misses in most steps
        outs = {}
        for gm in ("on", "eager"):
            eng = Engine(store, device="cuda", dtype=torch.float32, vram_budget=budget * size, ram_budget=0,
                         prefetch="off", decode_graph=gm, dense_quant=mode)
            assert isinstance(eng.model.w["layers.0.attn.o.weight"], PackedWeight)
            if gm == "on":
                assert isinstance(eng.fast.args[0]["wqkv"], PackedStack)
            outs[gm] = run_sequence(eng, ids, steps)
            if gm == "on":
                assert eng.fast.captured, eng.fast.why_not
                assert eng.fast.replays == len(steps)
            eng.close()
        assert torch.equal(outs["on"], outs["eager"]), budget
        assert (outs["on"] - ref).abs().max() < 2e-2, budget  # fp32: the CPU's and the GPU's kernels


def test_a_quantized_gguf_can_keep_its_blocks_on_the_gpu(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    import gguf_oracles as G
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))
    path = G.quantize(G.write_tiny_gguf(tmp_path / "tiny-f32.gguf", "Q8_0"), "q8_0")
    ids = list(range(3, 40))
    monkeypatch.setattr(kernels.select("cpu"), "gguf_act", "f32")  # the CUDA kernels take fp32 activations
    cpu = Engine(path, prefetch="off").forward(ids)
    assert Engine(path, device="cuda", prefetch="off").dense_quant == "none"  # auto on GPUs: bf16 floats
    gpu = Engine(path, device="cuda", dtype=torch.float32, prefetch="off", dense_quant="keep")
    assert any(isinstance(w, PackedWeight) and w.fmt == "q8_0" for w in gpu.model.w.values())
    assert (gpu.forward(ids) - cpu).abs().max() < 1e-3
