"""Decode with routing, the expert lookup and the KV position on the device
(runtime/graph_decode.py, pager/slot_table.py): the CPU twin of the graph-captured GPU step.

Oracles: the engine's ordinary decode path (same weights, SDPA attention over the exact length;
our step attends to the whole cache under a mask, so equal within float tolerance), and the same
step with every layer through the pager ("eager": the reference the fast path must equal bit for
bit, with and without misses, with the same hits and misses counted)."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.pager.pager import ExpertPager
from flashmoe_plugin.pager.slot_table import SlotTable
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.graph_decode import unsupported
from flashmoe_plugin.runtime.host_compute import HostCompute
from flashmoe_plugin.store.format import Store


def _seq(seed=11, n=12, m=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (n,), generator=g).tolist(), torch.randint(3, 384, (m,), generator=g).tolist()


def _run(store, ids, steps, **kw):
    eng = Engine(store, prefetch="off", **kw)
    out = run_sequence(eng, ids, steps)
    fast, stats = eng.fast, eng.pager.stats.snapshot()
    eng.close()
    return out, fast, stats


@pytest.mark.parametrize("quant", ["none", "q4"])
def test_device_step_equals_the_pager_path_with_and_without_misses(oracles, family, quant):
    store = oracles(family).store(quant)
    ids, steps = _seq()
    ref, _, _ = _run(store, ids, steps, decode_graph="off")
    probe = Engine(store, prefetch="off")
    size, k, total = probe.pager.record_size, probe.config.top_k, probe.pager.capacity
    why, moe = unsupported(probe), probe._moe_order
    probe.close()
    if why:  # a family the device step does not compute (MLA, sinks, ...): refused, auto stays off
        with pytest.raises(ValueError, match="does not implement"):
            Engine(store, prefetch="off", decode_graph="on")
        assert Engine(store, prefetch="off", decode_graph="auto").fast is None
        return
    fallbacks, kinds = {}, {}
    for budget in (total, k, 2 * k):  # all fit; one layer's worth (a miss in most steps); in between
        on, fast, s_on = _run(store, ids, steps, decode_graph="on", ram_budget=budget * size)
        kinds[budget] = type(fast).__name__, getattr(fast, "cpu", None)
        eager, slow, s_eager = _run(store, ids, steps, decode_graph="eager", ram_budget=budget * size)
        assert torch.equal(on, eager), budget
        assert (on - ref).abs().max() < 1e-4, budget  # masked whole-cache attention vs SDPA, fp32
        assert fast.steps == len(steps) and not fast.captured  # no capture on CPU
        assert {c: s_on[c] for c in ("hits", "misses", "device_hits")} == \
            {c: s_eager[c] for c in ("hits", "misses", "device_hits")}, budget
        fallbacks[budget] = fast.fallbacks
    # all fit: the whole-token step; only steps that route to an expert the prompt never loaded
    # fall back (from that layer, through the pager path)
    assert kinds[total] == ("DeviceDecode", None) and fallbacks[total] > 0
    # fewer slots than experts: cut at every MoE layer, each layer's experts through the pager
    # path between two segments (runtime/hybrid_decode.py), so nothing is recomputed
    assert kinds[k] == kinds[2 * k] == ("HybridDecode", moe) and fallbacks[k] == fallbacks[2 * k] == 0


def test_slot_table_follows_tier0(oracles):
    """The device-side table equals tier 0's map after every request, evictions included."""
    store = Store.open(oracles("qwen2_moe").store("q4"))
    cfg, layers = store.config, sorted(store.layers)
    p = ExpertPager(store, 3 * cfg.top_k * store.layout.size)
    table = SlotTable(p, layers, cfg.num_experts)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        layer = layers[int(torch.randint(len(layers), (1,), generator=g))]
        want = torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k].tolist()
        got = p.acquire(layer, want)
        slots = table.lookup(layer, torch.tensor(want))
        assert all(torch.equal(p.t0.slots[s], r) for s, r in zip(slots.tolist(), got))
        expect = torch.zeros_like(table.entries)
        for (l, e), s in p.t0.slot_of.items():
            expect[table.rows[l], e] = s
        assert torch.equal(table.entries, expect) and table.resident(layer, want)
    assert p.stats.evictions > 0
    table.detach()
    p.close()


def test_bad_decode_graph_mode(oracles):
    with pytest.raises(ValueError, match="decode_graph must be one of"):
        Engine(oracles("mixtral").store("q4"), decode_graph="fast")


@pytest.mark.parametrize("cheaper", ["cpu", "copy"])
def test_host_compute_auto_follows_its_cost_model(oracles, monkeypatch, cheaper):
    """host_compute="auto" with the timings stubbed: the CPU computes host-tier records exactly
    when the model says it is cheaper (the GPU test pins "off" because real timings flip)."""
    store = oracles("mixtral").store("q4")
    ids, steps = _seq(5, 10, 6)
    ref, _, _ = _run(store, ids, steps, decode_graph="off")
    cpu_s, copy_s = (1e-9, 1.0) if cheaper == "cpu" else (1.0, 1e-9)
    monkeypatch.setattr(HostCompute, "_calibrate", lambda self: (setattr(self, "cpu_s", cpu_s),
                                                                 setattr(self, "copy_s", copy_s)))
    probe = Engine(store, prefetch="off")
    size, k, total = probe.pager.record_size, probe.config.top_k, probe.pager.capacity
    probe.close()
    eng = Engine(store, prefetch="off", ram_budget=k * size, pager_options={"host_budget": total * size},
                 host_compute="on", decode_graph="off")
    eng.host_compute.mode = "auto"  # auto is GPU-only; the decision logic is the same here
    out = run_sequence(eng, ids, steps)
    s = eng.pager.stats
    eng.close()
    assert (out - ref).abs().max() < 1e-4
    assert s.host_hits > 0
    assert (s.host_computed > 0) == (cheaper == "cpu")
