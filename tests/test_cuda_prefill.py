"""Prefill through all of a layer's experts at once (Backend.grouped_ffn).

- everywhere: the engine's prefill gives the same logits whether the pager holds every used
  expert (one grouped call per layer) or only k of them (groups of k), and the torch backend's
  grouped_ffn is its expert_ffn per group (the CPU twin of the CUDA kernel);
- on a GPU: the grouped tensor-core GEMM (csrc/cuda/fm_prefill.cu) against float64 math on the
  dequantized weights, and against dequantize + cuBLAS, for q4 and q8, with the SwiGLU in its
  epilogue and without (an intermediate size not a multiple of 128), partial row tiles (N not a
  multiple of 256), token counts of 0, 1, 63, 64, 65 and 130 per expert, each kernel variant;
- on a GPU: a prompt from position 0 (attention with is_causal) and one in two chunks (the
  second with an explicit mask) give the same logits within bf16's rounding.
Tolerance 8e-3 relative (bf16 activations, weights rounded to bf16, the SwiGLU's product rounded
to bf16 as torch's reference does), as the other CUDA kernels' bf16 tests.
"""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.kernels.torch_backend import TorchBackend
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.layout import RecordLayout
from test_cuda_kernels import needs_gpu, rand_record, ref_expert, rel_err


# --------------------------------------------------------------------------- everywhere

def test_torch_grouped_ffn_is_expert_ffn_per_group():
    gen = torch.Generator().manual_seed(3)
    layout = RecordLayout.build("q4", 128, 192)
    recs = [rand_record(layout, gen) for _ in range(3)]
    counts = [5, 1, 9]
    x = torch.randn(sum(counts), 128, generator=gen)
    tb = TorchBackend()
    out = tb.grouped_ffn(x, recs, counts, layout)
    at = 0
    for rec, c in zip(recs, counts):
        assert torch.equal(out[at:at + c], tb.expert_ffn(x[at:at + c], rec, layout))
        at += c


def test_engine_prefill_same_logits_whatever_the_grouping(oracles):
    """Every used expert in one grouped call per layer (loading them), all of a layer's experts
    in one call with the counts left on the device (all resident), or the pager's capacity (k
    records) at a time: the same logits, bit for bit (the per-token sums run in one order)."""
    store = oracles("mixtral").store("q8")
    ids = list(range(5, 45))
    full = Engine(store, prefetch="off")
    ref = full.forward(ids)
    full.reset()
    for layer, info in full.store.layers.items():
        full.pager.acquire(layer, list(range(info.experts)))
    assert torch.equal(full.forward(ids), ref)
    size, k = full.store.layout.size, full.config.top_k
    full.close()
    small = Engine(store, ram_budget=k * size, prefetch="off")
    assert small.pager.capacity == k
    out = small.forward(ids)
    small.close()
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- GPU

def _kernel():
    from flashmoe_plugin.kernels import prefill_cuda
    if prefill_cuda.kernels() is None:
        pytest.skip("flashmoe_plugin._prefill_cuda is not built (no nvcc at install, or FLASHMOE_CUDA=0)")
    return prefill_cuda


def test_permute8_order():
    from flashmoe_plugin.kernels.prefill_cuda import permute8
    x = torch.arange(32.0).view(2, 16)
    assert permute8(x)[1].tolist() == [16, 20, 17, 21, 18, 22, 19, 23, 24, 28, 25, 29, 26, 30, 27, 31]


@pytest.mark.parametrize("fmt,variant", [("q4", "auto"), ("q4", "dequant"), ("q8", "auto")])
@pytest.mark.parametrize("H,I,counts", [
    (256, 384, [1, 64, 65, 130]),   # SwiGLU fused in the first launch's epilogue
    (320, 192, [63, 0, 13, 64]),    # no fusion (192 % 128), a partial 256-row tile (320), an empty expert
])
@pytest.mark.cuda
@needs_gpu
def test_grouped_gemm_matches_reference(fmt, variant, H, I, counts, monkeypatch):
    pc = _kernel()
    monkeypatch.setattr(pc, "variant", variant)
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    gen = torch.Generator().manual_seed(11)
    layout = RecordLayout.build(fmt, H, I)
    recs = [rand_record(layout, gen) for _ in counts]
    drecs = [r.cuda() for r in recs]
    x = torch.randn(sum(counts), H, generator=gen).bfloat16()
    out = pc.grouped_ffn(x.cuda(), drecs, counts, layout)
    assert out.shape == (sum(counts), H) and out.dtype == torch.bfloat16
    be = CudaBackend()
    at = 0
    for rec, drec, c in zip(recs, drecs, counts):
        if c:
            got = out[at:at + c]
            err = rel_err(got, ref_expert(x[at:at + c], rec, layout))
            assert err <= 8e-3, f"{fmt} {variant} count {c}: {err}"
            cublas = be.dequant_ffn(x[at:at + c].cuda(), drec, layout)
            assert rel_err(got, cublas.double()) <= 8e-3, f"{fmt} count {c} vs dequantize + cuBLAS"
        at += c


@pytest.mark.cuda
@needs_gpu
def test_backend_grouped_ffn_picks_the_kernel_and_falls_back(monkeypatch):
    pc = _kernel()
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    gen = torch.Generator().manual_seed(5)
    layout = RecordLayout.build("q4", 256, 256)
    drecs = [rand_record(layout, gen).cuda() for _ in range(2)]
    be = CudaBackend()
    x = torch.randn(40, 256, generator=gen).bfloat16().cuda()
    assert pc.supports(x, layout) and not pc.supports(x.float(), layout)
    calls = []
    kernel = pc.grouped_ffn
    monkeypatch.setattr(pc, "grouped_ffn", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    cases = [([20, 20], True), ([3, 37], True), ([4, 4], False),  # fused kernel per expert
             (torch.tensor([20, 20], device="cuda"), True)]       # counts left on the device
    for counts, grouped in cases:
        n = int(sum(counts))
        xs = x[:n]
        calls.clear()
        out = be.grouped_ffn(xs, drecs, counts, layout, most=20 if isinstance(counts, torch.Tensor) else None)
        c = [int(v) for v in counts]
        ref = torch.cat([be.dequant_ffn(xs[a:a + k], r, layout) for r, a, k in zip(drecs, (0, c[0]), c)])
        assert rel_err(out, ref.double()) <= 8e-3, counts
        assert bool(calls) == grouped, counts
    be.grouped_max_tokens = {"q4": 10}  # many tokens per expert: dequantize + cuBLAS per expert
    calls.clear()
    be.grouped_ffn(x, drecs, [20, 20], layout)
    assert not calls
    # fp32 activations go through expert_ffn per expert
    assert be.grouped_ffn(x.float(), drecs, [20, 20], layout).dtype == torch.float32


@pytest.mark.cuda
@needs_gpu
def test_engine_prefill_on_gpu(oracles, monkeypatch):
    """The engine's bf16 prefill through the grouped kernel against the CPU engine (fp32) and
    against the same GPU engine with the kernel turned off (an expert at a time)."""
    pc = _kernel()
    store = oracles("mixtral").store("q4")
    ids = list(range(3, 3 + 200))
    cpu = Engine(store, prefetch="off")
    ref = cpu.forward(ids)
    cpu.close()
    eng = Engine(store, device="cuda", prefetch="off", dense_quant="none")  # the float dense part of the CPU run
    out = eng.forward(ids)  # loading the experts: the used ones, counts read back
    for layer, info in eng.store.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    eng.reset()
    resident = eng.forward(ids)  # all resident: every expert in the call, counts left on the GPU
    eng.reset()
    monkeypatch.setattr(pc, "supports", lambda x, layout: False)
    per_expert = eng.forward(ids)
    eng.close()
    assert torch.equal(resident, out)
    # bf16 activations either way; the q4 kernel multiplies the exact codes where dequantize +
    # cuBLAS rounds each weight to bf16 (on the H200: 1.4e-2 apart, each ~as far from fp32)
    assert rel_err(out, ref.double()) <= 3e-2
    assert rel_err(per_expert, ref.double()) <= 3e-2
    assert rel_err(out, per_expert.double()) <= 3e-2


@pytest.mark.cuda
@needs_gpu
def test_gpu_prompt_attention_causal_and_masked_agree(oracles):
    """A GPU prompt from position 0 runs SDPA with is_causal and no mask (flash attention, GQA
    included); a later chunk keeps the explicit mask. The same prompt whole and in two chunks
    gives the same logits within bf16's rounding, and the whole one those of the CPU engine."""
    store = oracles("mixtral").store("q4")
    ids = list(range(3, 3 + 96))
    cpu = Engine(store, prefetch="off")
    ref = cpu.forward(ids)
    cpu.close()
    eng = Engine(store, device="cuda", prefetch="off", dense_quant="none")  # the float dense part of the CPU run
    assert eng.config.num_heads != eng.config.num_kv_heads  # the GQA case that had no flash path
    whole = eng.forward(ids)
    eng.reset()
    chunked = torch.cat([eng.forward(ids[:40]), eng.forward(ids[40:])])
    eng.close()
    assert rel_err(whole, ref.double()) <= 3e-2
    assert rel_err(chunked, whole.double()) <= 3e-2
