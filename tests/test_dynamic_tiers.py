"""Dynamic tiers beside a GPU (issue 10, row 2), on the CPU twin: host-tier records computed by the
C kernels from the decode step's packed row (runtime/hybrid_decode.py), the copy-or-compute cost
model with the CPU's fixed time per call, copies up only where they land in time (HostCompute.
copies_ahead), no look-ahead when nothing can be read or copied, and the host tier sized by the
records VRAM really holds. Oracles: the all-resident run and the layer-by-layer path (same
weights; the host's experts are summed after the others: tolerance 1e-4)."""
import types

import torch
from conftest import run_sequence

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.graph_decode import unsupported
from flashmoe_plugin.runtime.host_compute import HostCompute
from flashmoe_plugin.runtime.hybrid_decode import HybridDecode

_Pager = types.SimpleNamespace  # the two fields HostCompute's swap price reads (t0, capacity)


def _seq(seed=7, n=12, m=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (n,), generator=g).tolist(), torch.randint(3, 384, (m,), generator=g).tolist()


def _sizes(store):
    probe = Engine(store, prefetch="off")
    out = probe.pager.record_size, probe.config.top_k, probe.pager.capacity, unsupported(probe)
    probe.close()
    return out


def test_tiered_step_computes_host_records_from_the_packed_row(oracles, family):
    """Cut at every MoE layer (the device tier holds two layers' worth), the rest in the host tier
    and computed on the CPU from x and the weights the step packed (no read-back of its own)."""
    store = oracles(family).store("q4")
    ids, steps = _seq()
    size, k, total, why = _sizes(store)
    if why:  # a family the device step does not compute: nothing to cut
        return
    full = Engine(store, prefetch="off")
    ref = run_sequence(full, ids, steps)
    full.close()
    outs, stats = {}, {}
    for graph in ("on", "off"):
        eng = Engine(store, prefetch="off", ram_budget=2 * k * size, pager_options={"host_budget": total * size},
                     host_compute="on", decode_graph=graph)
        if graph == "on":
            assert isinstance(eng.fast, HybridDecode) and eng.fast.cpu == eng._moe_order
        outs[graph] = run_sequence(eng, ids, steps)
        stats[graph] = eng.pager.stats.snapshot()
        eng.close()
    assert (outs["on"] - ref).abs().max() < 1e-4 and (outs["on"] - outs["off"]).abs().max() < 1e-4
    assert stats["on"]["host_computed"] > 0 and stats["on"]["misses"] == stats["off"]["misses"]


def test_cost_model_counts_the_cpu_calls_fixed_time():
    """H200, Mixtral q4: a copy 1.8 ms, one expert on the CPU ~1.1 ms, two ~1.6 (cpu_o 0.6 + 2 x
    0.5). A per-record cost from one-record calls (1.1) sent one of two host records up (1.8 ms
    for the layer); the affine cost keeps both on the CPU (1.6 ms)."""
    hc = HostCompute.__new__(HostCompute)
    hc.mode, hc.copy_s, hc._pager = "auto", 1.8e-3, _Pager(t0=[], capacity=4)  # a free slot: copies cost copy_s
    hc.cpu_s, hc.cpu_o = 1.1e-3, 0.0
    assert hc.share(2) == 1
    hc.cpu_s, hc.cpu_o = 0.5e-3, 0.6e-3
    assert [hc.share(m) for m in (1, 2)] == [1, 2]
    hc.cpu_s, hc.cpu_o = 3e-3, 0.6e-3  # a slow CPU: copies up
    assert hc.share(2) == 1 and hc.share(1) == 0


def test_a_copy_into_a_full_device_tier_is_priced_as_a_swap():
    """Measured on the H200 (h200-d11-row2.json): copy 1.79 ms, CPU 0.13 + n x 0.91. A layer's two
    host records: a copy alone (1.79) looked cheaper than the CPU (1.95); as a swap (the victim
    comes down beside it, over the same RAM) it is not, and both stay on the CPU."""
    hc = HostCompute.__new__(HostCompute)
    hc.mode, hc.copy_s, hc.cpu_s, hc.cpu_o = "auto", 1.79e-3, 0.91e-3, 0.13e-3
    hc._pager = _Pager(t0=[0] * 4, capacity=4)
    assert hc.share(2) == 2          # a full device tier: twice copy_s
    hc._pager.t0 = [0] * 3
    assert hc.share(2) == 1          # a free slot: no victim, a copy costs copy_s


def test_copies_up_ahead_only_where_copies_are_the_cheaper_way():
    """H200 costs: no copy up ahead where the CPU is the cheaper way; with the A/B switch, a
    guessed record of the next layer goes up only while the CPU computes this layer's host
    records for at least a copy's time, and never behind another copy up."""
    class Copies:
        idle = True

        def up_idle(self):
            return self.idle

    class Pager:
        copies, t0, capacity = Copies(), [0] * 4, 4  # a full device tier

    hc = HostCompute.__new__(HostCompute)
    hc._pager, hc.mode, hc.copy_s, hc.cpu_s, hc.cpu_o = Pager(), "auto", 1.8e-3, 0.91e-3, 0.13e-3
    assert hc.copies_ahead(3.7e-3) == 0           # the default: the CPU is the cheaper way, no copies up
    hc.prefetch_up = True                         # the A/B switch: copies beside the CPU's share
    assert hc.copies_ahead(hc.cpu_time(0)) == 0   # nothing on the CPU: a copy would be waited for
    assert hc.copies_ahead(hc.cpu_time(1)) == 0   # one record: 1.04 ms, shorter than a copy
    assert hc.copies_ahead(hc.cpu_time(2)) == 1   # two: 1.95 ms, one copy fits beside them
    assert hc.copies_ahead(3.7e-3) == 2           # two copies, one after the other
    Pager.copies.idle = False
    assert hc.copies_ahead(3.7e-3) == 0           # a copy up still on the engine: none queued behind it
    Pager.copies.idle, hc.prefetch_up, hc.cpu_s = True, False, 5e-3
    assert hc.copies_ahead(0.0) > 1000            # a slow CPU: copies are the way up, ahead of time too
    hc.mode = "off"
    assert hc.copies_ahead(0.0) > 1000            # without host compute copies are the only way up


def _prefetch_run(store, ids, steps, host_records, copy_s, monkeypatch):
    monkeypatch.setattr(HostCompute, "_calibrate", lambda self: (setattr(self, "cpu_s", 1e-3),
                                                                 setattr(self, "copy_s", copy_s)))
    size, k, total, _ = _sizes(store)
    eng = Engine(store, prefetch="on", prefetch_depth=1, ram_budget=2 * k * size,
                 pager_options={"host_budget": host_records(total) * size}, host_compute="on", decode_graph="off")
    eng.host_compute.mode = "auto"  # auto is GPU-only; the decisions are the same here
    out = run_sequence(eng, ids, steps)
    s, pred = eng.pager.stats.snapshot(), eng.predictor.snapshot()
    eng.close()
    return out, s, pred["by_distance"][1]["guesses"]


def test_look_ahead_only_when_a_prefetch_can_land(oracles, monkeypatch):
    store = oracles("mixtral").store("q4")
    ids, steps = _seq(3)
    full = Engine(store, prefetch="off")
    ref = run_sequence(full, ids, steps)
    full.close()
    # the tiers hold every record and a copy would land late: no guess, no copy up
    out, s, guesses = _prefetch_run(store, ids, steps, lambda t: t, 1e9, monkeypatch)
    assert (out - ref).abs().max() < 1e-4
    assert guesses == 0 and s["prefetch_copies"] == 0 and s["host_computed"] > 0
    # copies that land in time: guessed host records go up ahead of their layer
    out, s, guesses = _prefetch_run(store, ids, steps, lambda t: t, 1e-12, monkeypatch)
    assert (out - ref).abs().max() < 1e-4 and guesses > 0 and s["prefetch_copies"] > 0
    # some records only on disk: the look-ahead still guesses (its reads may pay), copies stay off
    out, s, guesses = _prefetch_run(store, ids, steps, lambda t: t // 3, 1e9, monkeypatch)
    assert (out - ref).abs().max() < 1e-4 and guesses > 0 and s["prefetch_copies"] == 0


def test_host_tier_takes_what_the_vram_records_leave(oracles, monkeypatch):
    """--vram-budget 8G --ram-budget 24G on Mixtral q4: 8G holds 86 records of 94.5 MiB, and the
    host tier must hold the other 170 (the budget's bytes left 169: one record read from disk in
    most tokens)."""
    eng = Engine.__new__(Engine)
    size = 99090432  # one Mixtral q4 record
    eng.store = type("S", (), {"expert_bytes": 256 * size, "layout": type("L", (), {"size": size})()})()
    eng.cpu_layers, eng.device = None, torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 140 << 30))
    vram, host = eng._budgets(24 << 30, 8 << 30)
    assert vram // size == 86 and host // size == 170
