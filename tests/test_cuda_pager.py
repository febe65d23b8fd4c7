"""The tiered pager on a real GPU: VRAM tier, pinned host tier, copy stream and events.

Oracles: the CPU engine's logits (fp32), the same GPU engine with every expert resident, and the
LRU simulator for both tiers together. Skipped without a CUDA GPU (CI has none); run on the H200."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.pager.belady import simulate
from flashmoe_plugin.pager.pager import BudgetError
from flashmoe_plugin.pager.policies import LRU
from flashmoe_plugin.pager.trace import RoutingTrace
from flashmoe_plugin.runtime.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the pager's GPU tiers are not tested: no NVIDIA GPU is visible to torch "
                                       "on this machine (their CPU twin runs in test_pager.py)")


@pytest.mark.parametrize("quant", ["none", "q4"])
def test_tiers_on_the_gpu(oracles, family, quant):
    store = oracles(family).store(quant)
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(3, 384, (20,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    cpu = Engine(store, prefetch="off")
    ref_cpu = run_sequence(cpu, ids, steps)
    size, total, k = cpu.pager.record_size, cpu.pager.capacity, cpu.config.top_k
    cpu.close()
    full = Engine(store, device="cuda", dtype=torch.float32, vram_budget=total * size, ram_budget=0, prefetch="off")
    ref = run_sequence(full, ids, steps)
    full.close()
    tol = 1e-3 if quant == "none" else 2e-2  # fp32 torch vs fp32 native kernels (quantized weights)
    assert (ref - ref_cpu).abs().max() < tol
    for n0, n1, prefetch, threads in ((k, total // 3, "off", 4), (k, 0, "on", 0), (2 * k, total // 3, "on", 0)):
        # host_compute off: "auto" picks CPU or copy by measured timings, so its logits (CPU kernels,
        # another summation order) would differ from run to run; tests/test_graph_decode.py checks
        # "auto" against stubbed timings
        eng = Engine(store, device="cuda", dtype=torch.float32, vram_budget=n0 * size, ram_budget=n1 * size,
                     policy="lru", prefetch=prefetch, prefetch_depth=2, io_threads=threads, host_compute="off")
        trace = RoutingTrace()
        eng.record(trace)
        out = run_sequence(eng, ids, steps)
        p, s = eng.pager, eng.pager.stats
        eng.close()
        assert torch.equal(out, ref), (n0, n1, prefetch)
        assert p.t0.slots.is_cuda and (p.t1 is None or not p.t1.slots.is_cuda)
        assert not set(p.t0.slot_of) & (set(p.t1.slot_of) if p.t1 else set())
        assert s.bytes_copied > 0 and p.capacity == n0 and p.host_capacity == n1
        if prefetch == "off":
            reqs = trace.request_keys()
            assert s.hits == simulate(LRU(n0 + n1), reqs, n0 + n1).hits and s.host_hits > 0
        else:
            assert s.prefetch_reads + s.prefetch_copies > 0 and s.prefetch_cancelled > 0


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_host_compute_on_the_gpu(oracles, mode):
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(3, 384, (16,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    probe = Engine(store, prefetch="off")
    size, total, k = probe.pager.record_size, probe.pager.capacity, probe.config.top_k
    probe.close()
    full = Engine(store, device="cuda", dtype=torch.float32, vram_budget=total * size, ram_budget=0, prefetch="off")
    ref = run_sequence(full, ids, steps)
    full.close()
    eng = Engine(store, device="cuda", dtype=torch.float32, vram_budget=k * size, ram_budget=total * size,
                 prefetch="off", host_compute=mode)
    out = run_sequence(eng, ids, steps)
    hc, s = eng.host_compute, eng.pager.stats
    eng.close()
    assert (out - ref).abs().max() < 2e-2  # the CPU and GPU q4 kernels differ in summation order
    assert hc.mode == mode
    if mode == "on":
        assert s.host_computed > 0 and s.host_computed <= s.host_hits
    else:  # the cost model measured both sides (which one wins depends on the machine)
        assert hc.copy_s > 0 and hc.cpu_s > 0


def test_gpu_budget_errors(oracles):
    store = oracles("mixtral").store("q4")
    probe = Engine(store, prefetch="off")
    size, k = probe.pager.record_size, probe.config.top_k
    probe.close()
    with pytest.raises(BudgetError, match="VRAM budget .* minimum"):
        Engine(store, device="cuda", vram_budget=k * size - 1)
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(ValueError, match="exceeds what is free"):
        Engine(store, device="cuda", vram_budget=2 * free)
