"""Graph-captured decode on a real GPU (runtime/graph_decode.py): routing, the slot lookup and
the KV position on the device, the whole step replayed as one CUDA graph.

Oracles: the same step run eagerly with every layer through the pager (decode_graph="eager":
same kernels, so the logits must be torch.equal), with and without misses, and the CPU engine's
ordinary path (the GPU tests' q4 tolerance). Skipped without a CUDA GPU (CI has none)."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.graph_decode import unsupported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU visible to torch (none on this machine)")


def _gpu(store, budget, size, mode, ids, steps, dtype=torch.float32):
    eng = Engine(store, device="cuda", dtype=dtype, vram_budget=budget * size, ram_budget=0, prefetch="off",
                 decode_graph=mode)
    out = run_sequence(eng, ids, steps)
    fast, stats = eng.fast, eng.pager.stats.snapshot()
    eng.close()
    return out, fast, stats


def test_graph_decode_equals_eager_in_every_family(oracles, family):
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(13)
    ids, steps = torch.randint(3, 384, (16,), generator=g).tolist(), torch.randint(3, 384, (10,), generator=g).tolist()
    cpu = Engine(store, prefetch="off", decode_graph="off")
    if unsupported(cpu):  # MLA, sinks, ...: the CPU test checks the refusal; nothing to capture here
        cpu.close()
        return
    ref = run_sequence(cpu, ids, steps)
    size, total, k = cpu.pager.record_size, cpu.pager.capacity, cpu.config.top_k
    cpu.close()
    for budget in (total, k):  # every expert fits / one layer's worth: misses in most steps
        out, fast, s = _gpu(store, budget, size, "on", ids, steps)
        eager, _, s_eager = _gpu(store, budget, size, "eager", ids, steps)
        assert fast.captured, fast.why_not
        assert fast.replays == len(steps)
        assert torch.equal(out, eager), budget
        assert (out - ref).abs().max() < 2e-2, budget  # fp32 torch vs fp32 native q4 kernels
        assert (s["hits"], s["misses"]) == (s_eager["hits"], s_eager["misses"])
        if budget == k:  # fewer slots than experts: cut at every MoE layer (runtime/hybrid_decode.py)
            assert type(fast).__name__ == "HybridDecode" and fast.fallbacks == 0
            assert fast.cpu  # (its graphs were dropped by close(); captured is asserted above)
    if family != "mixtral":  # bf16 once (each dtype and shape compiles the decode ops again)
        return
    bf, fast, _ = _gpu(store, total, size, "on", ids, steps, torch.bfloat16)
    bf_eager, _, _ = _gpu(store, total, size, "eager", ids, steps, torch.bfloat16)
    assert fast.captured and torch.equal(bf, bf_eager)


def test_graph_decode_is_the_cuda_default(oracles):
    store = oracles("mixtral").store("q4")
    eng = Engine(store, device="cuda", prefetch="off")
    try:
        assert eng.fast is not None and eng.fast.mode == "on", eng.decode_graph_reason
        logits = eng.forward([5, 6, 7])
        for t in (8, 9, 10):
            logits = eng.forward([t])
        assert eng.fast.graph is not None and eng.fast.kernels_per_step() is not None
        assert torch.isfinite(logits).all()
    finally:
        eng.close()
    none = Engine(oracles("mixtral").store("none"), device="cuda", prefetch="off")
    assert none.fast is None and "native" in none.decode_graph_reason
    none.close()
