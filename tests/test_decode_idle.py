"""The decode step's host work off the GPU's critical path (runtime/graph_decode.py's _settle):
misses counted on the device (decode_ops.missing, from the slot table's `present` marks) and the
hits' policy touches left until the next token's replay is queued (pager.note_hits(later=True)).

Oracles: a pager that touches at once, fed the same requests (same evictions, same stats after
every step, the same policy state once the deferred touches are done); tier 0's own map for the
device's miss counts; a step with every expert resident never falls back."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.pager.pager import ExpertPager
from flashmoe_plugin.pager.slot_table import SlotTable
from flashmoe_plugin.pager.stats import COUNTERS
from flashmoe_plugin.runtime import decode_ops
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import Store


@pytest.mark.parametrize("policy", ["lru", "lfu", "auto"])
def test_deferred_touches_leave_the_pager_as_immediate_ones(oracles, policy):
    store = Store.open(oracles("qwen2_moe").store("q4"))
    cfg, layers = store.config, sorted(store.layers)
    now, later = (ExpertPager(store, 3 * cfg.top_k * store.layout.size, policy=policy) for _ in range(2))
    g = torch.Generator().manual_seed(3)
    noted = 0
    for _ in range(120):
        layer = layers[int(torch.randint(len(layers), (1,), generator=g))]
        # a small pool of experts, so that hits (noted) and misses (requests that evict) mix
        want = (torch.randperm(cfg.num_experts // 2, generator=g)[:cfg.top_k]).tolist()
        if all(now.resident(layer, e) for e in want):
            now.note_hits(layer, want)
            later.note_hits(layer, want, later=True)
            noted += 1
        else:
            now.acquire(layer, want)
            later.acquire(layer, want)
        assert now.t0.slot_of == later.t0.slot_of
        assert _counts(now) == _counts(later)
    later.touch_noted()
    assert _state(now.policy) == _state(later.policy)
    assert noted > 10 and now.stats.evictions > 10
    now.close()
    later.close()


def test_missing_counts_the_absent_entries(oracles):
    g = torch.Generator().manual_seed(0)
    present = (torch.rand(6, 16, generator=g) > 0.5).long()
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(6)])
    out = torch.full((6,), -1, dtype=torch.long)
    decode_ops.missing(present, ids, out)
    assert out.tolist() == [sum(1 for e in row if not present[r, e]) for r, row in enumerate(ids.tolist())]


def test_present_follows_tier0(oracles):
    store = Store.open(oracles("mixtral").store("q4"))
    cfg, layers = store.config, sorted(store.layers)
    p = ExpertPager(store, 2 * cfg.top_k * store.layout.size)
    table = SlotTable(p, layers, cfg.num_experts)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        layer = layers[int(torch.randint(len(layers), (1,), generator=g))]
        p.acquire(layer, torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k].tolist())
        expect = torch.zeros_like(table.present)
        for (l, e) in p.t0.slot_of:
            expect[table.rows[l], e] = 1
        assert torch.equal(table.present, expect)
    assert p.stats.evictions > 0
    table.detach()
    p.close()


def test_a_step_with_every_expert_resident_never_falls_back(oracles):
    store = oracles("mixtral").store("q4")
    eng = Engine(store, prefetch="off", decode_graph="on")
    E, f = eng.config.num_experts, eng.fast
    assert E <= eng.pager.capacity
    for layer in f.order:
        eng.pager.acquire(layer, list(range(E)))
    g = torch.Generator().manual_seed(7)
    ids, steps = torch.randint(3, 384, (6,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    before = eng.pager.stats.snapshot()
    run_sequence(eng, ids, steps)
    after = eng.pager.stats.snapshot()
    k = eng.config.top_k
    assert f.fallbacks == 0 and f.steps == len(steps)
    assert len(eng.pager._noted) == 1  # the last step's touches wait for the next step (or request)
    assert not f.route_host[f.at:].any()
    assert after["misses"] == before["misses"]
    # the prompt's request path counts distinct experts per layer; each step counts k per layer
    assert after["device_hits"] - before["device_hits"] >= len(steps) * len(f.order) * k
    eng.close()


@pytest.mark.parametrize("budget", ["resident", "cold", "one layer"])
def test_a_device_steps_trace_is_the_pager_paths(oracles, budget):
    """The step's trace records are deferred with its touches (the next replay goes first): the
    recorded requests (Belady's input) and routes must be those of the same run through the pager
    path, in the same order, with and without misses (a miss's own requests come after the earlier
    layers' deferred records), and nothing may stay pending once the trace is detached."""
    from flashmoe_plugin.pager.trace import RoutingTrace
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(3, 384, (6,), generator=g).tolist(), torch.randint(3, 384, (10,), generator=g).tolist()
    traces = {}
    for mode in ("on", "eager"):
        eng = Engine(store, prefetch="off", decode_graph=mode)
        if budget == "resident":  # every expert resident first: no step falls back
            for layer in eng._moe_order:
                eng.pager.acquire(layer, list(range(eng.config.num_experts)))
        elif budget == "one layer":  # the device tier holds one layer's: cut at every layer
            eng.close()
            k = eng.config.top_k
            eng = Engine(store, prefetch="off", decode_graph=mode, ram_budget=k * eng.pager.record_size)
        trace = RoutingTrace()
        eng.record(trace)
        run_sequence(eng, ids, steps)
        eng.record(None)
        assert not eng.pager._noted
        traces[mode] = trace, (eng.fast.fallbacks, type(eng.fast).__name__)
        eng.close()
    (on, fell), (eager, _) = traces["on"], traces["eager"]
    assert on.requests() == eager.requests() and on.decode_mask() == eager.decode_mask()
    assert on._req_step == eager._req_step
    (la, pa, ia), (lb, pb, ib) = on.routes(), eager.routes()
    key = lambda l, p: sorted(range(len(l)), key=lambda i: (p[i], l[i]))  # noqa: E731
    a, b = key(la, pa), key(lb, pb)
    assert (la[a] == lb[b]).all() and (pa[a] == pb[b]).all() and (ia[a] == ib[b]).all()
    # cold: every expert fits but the prompt loaded few, so steps fall back from a missing layer
    assert fell == {"resident": (0, "DeviceDecode"), "one layer": (0, "HybridDecode")}.get(budget, fell)
    assert budget != "cold" or fell[0] > 0


def _counts(pager) -> dict:
    """The pager's counters but its read time (a timing)."""
    s = pager.stats.snapshot()
    return {c: s[c] for c in COUNTERS if c != "read_seconds"}


def _state(x):
    """A policy's whole state as plain values (orders of ordered maps kept)."""
    if isinstance(x, dict):
        return [(k, _state(v)) for k, v in x.items()]
    if isinstance(x, (list, tuple)):
        return [_state(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "__dict__"):
        return (type(x).__name__, _state(vars(x)))
    return x


def test_greedy_is_torch_argmax_with_ties_and_nans():
    from flashmoe_plugin.runtime.sampling import greedy
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        x = torch.randn(4096, generator=g)
        if i % 3 == 0:  # ties: the first maximum
            x[torch.randint(4096, (5,), generator=g)] = x.max() + 1
        if i % 7 == 0:  # NaN counts as the maximum
            x[torch.randint(4096, (2,), generator=g)] = float("nan")
        if i % 11 == 0:
            x[:] = float("-inf")
        assert greedy(x) == int(torch.argmax(x)), i


def test_the_compiled_calls_inputs_are_aligned(oracles):
    """Inductor copies an input whose address is not 16-byte aligned into a fresh buffer and back
    around a compiled call: the routing buffer's ids rows and miss counts must all be aligned."""
    for family in ("mixtral", "qwen2_moe"):
        eng = Engine(oracles(family).store("q4"), prefetch="off", decode_graph="on")
        f = eng.fast
        assert f.misses.data_ptr() % 16 == 0
        if f.ids.shape[1] % 2 == 0:  # rows of an odd k are misaligned by their own layout, as before
            assert all(f.ids[r].data_ptr() % 16 == 0 for r in range(f.ids.shape[0]))
        eng.close()
