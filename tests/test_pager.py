"""The tiered pager and the prefetch predictor, on the CPU twin of the CUDA arrangement (a device
tier over a host victim tier, staging buffers, the same code with synchronous copies).

Oracles: the reference logits of a run with every expert resident; the LRU simulator for both
tiers together (an exclusive LRU victim cache under an LRU tier holds exactly the most recently
used records of both capacities)."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.pager.belady import simulate
from flashmoe_plugin.pager.pager import BudgetError
from flashmoe_plugin.pager.policies import LRU
from flashmoe_plugin.pager.predictor import Predictor
from flashmoe_plugin.pager.trace import RoutingTrace
from flashmoe_plugin.runtime.engine import Engine

POLICIES = ("lru", "lfu", "fwlru", "lrfu", "auto", "static", "belady")


def twin(store, n0, n1, size, **kw):
    return Engine(store, ram_budget=n0 * size, pager_options={"host_budget": n1 * size}, **kw)


def sizes(store):
    probe = Engine(store, prefetch="off")
    out = probe.pager.record_size, probe.pager.capacity, probe.config.top_k
    probe.close()
    return out


def check_exclusive(pager):
    t0, t1 = set(pager.t0.slot_of), set(pager.t1.slot_of) if pager.t1 else set()
    assert not t0 & t1, "a record is in two tiers"
    assert len(t0) <= pager.capacity and len(t1) <= pager.host_capacity


def test_two_tiers_match_the_lru_simulator(profiled):
    store, ids, steps, ref = profiled
    size, total, k = sizes(store)
    for n0, n1 in {(k, k), (k, total // 3), (2 * k, total - 2 * k - 1)}:
        eng = twin(store, n0, n1, size, policy="lru", prefetch="off")
        trace = RoutingTrace()
        eng.record(trace)
        out = run_sequence(eng, ids, steps)
        p, s = eng.pager, eng.pager.stats
        check_exclusive(p)
        eng.close()
        assert torch.equal(out, ref), (n0, n1)
        reqs = trace.request_keys()
        assert p.capacity == n0 and p.host_capacity == n1
        assert s.hits == s.device_hits + s.host_hits == simulate(LRU(n0 + n1), reqs, n0 + n1).hits
        assert s.demoted > 0 and (s.host_hits > 0 or n1 < total // 3)
        # every device-tier fill came through a copy: host hits and disk reads alike
        assert s.bytes_copied == (s.host_hits + s.misses) * size
        assert s.bytes_read == s.misses * size


def test_logits_identical_with_prefetch_for_every_policy_tier_and_budget(profiled):
    store, ids, steps, ref = profiled
    size, total, k = sizes(store)
    issued = cancelled = used = 0
    # io_threads=0: reads run only when waited for, so prefetches are still in flight when their
    # layer routes, and the wrong ones are cancelled (with threads, tiny records land at once)
    for n0, n1, threads in ((k, 0, 0), (max(k, total * 2 // 5), 0, 4), (k, total // 3, 0), (2 * k, total // 3, 4)):
        for policy in POLICIES:
            eng = twin(store, n0, n1, size, policy=policy, prefetch="on", prefetch_depth=2, io_threads=threads)
            out = run_sequence(eng, ids, steps)
            s, pred = eng.pager.stats, eng.predictor.snapshot()
            if n1:
                check_exclusive(eng.pager)
            eng.close()
            assert torch.equal(out, ref), (policy, n0, n1)
            assert not eng.pager.reads, "reads left in flight"
            issued += s.prefetch_reads + s.prefetch_copies
            cancelled += s.prefetch_cancelled
            used += s.prefetch_used
            assert s.prefetch_used <= s.prefetch_reads + s.prefetch_copies
            assert 0 <= pred["precision"] <= 1 and 0 <= pred["recall"] <= 1
    assert issued > 0 and used > 0 and cancelled > 0


def test_host_tier_records_computed_on_the_cpu(profiled):
    store, ids, steps, ref = profiled
    size, total, k = sizes(store)
    eng = twin(store, k, total // 3, size, prefetch="off", host_compute="on")
    out = run_sequence(eng, ids, steps)
    s = eng.pager.stats
    check_exclusive(eng.pager)
    eng.close()
    # the decode step adds the host-computed experts after the others: same values, another order
    assert torch.allclose(out, ref, atol=1e-5, rtol=0) and s.host_computed > 0
    assert s.host_computed <= s.host_hits
    off = twin(store, k, total // 3, size, prefetch="off")
    assert off.host_compute.mode == "off"  # auto: only GPU runs with a host tier
    off.close()


def test_prefetch_auto_and_off(profiled):
    store, ids, steps, ref = profiled
    size, total, k = sizes(store)
    off = Engine(store, ram_budget=k * size, prefetch="off")
    assert torch.equal(run_sequence(off, ids, steps), ref) and off.predictor is None
    assert off.pager.stats.prefetch_reads == 0
    off.close()
    auto = Engine(store, ram_budget=k * size, prefetch="auto")
    assert torch.equal(run_sequence(auto, ids, steps), ref)
    snap = auto.predictor.snapshot()
    auto.close()
    # auto grades its guesses before it trusts them: the first min_observations are never prefetched
    assert snap["by_distance"][1]["guesses"] > 0 and snap["busy_ms_per_layer"] is not None


def test_predictor_grades_and_cost_model():
    p = Predictor("auto", depth=2)
    for _ in range(Predictor.min_observations):
        p.guessed(1, [0, 1], 1)
        p.guessed(1, [5, 6], 2)
        p.observe(1, [1, 2])
    assert p.precision(1) == 0.5 and p.recall(1) == 0.5 and p.precision(2) == 0.0
    assert p.precision() == 0.25 and p.snapshot()["by_layer"][1]["precision"] == 0.25
    assert p.allow(1, from_disk=False) and not p.allow(2, from_disk=False)
    p.busy_s, p.read_s = 0.010, 0.005    # reads hide behind compute: p x read > (1 - p) x read? no
    assert not p.allow(1, from_disk=True)
    p.busy_s, p.read_s = 0.010, 0.001
    assert not p.allow(1, from_disk=True)  # no cold guess graded yet: no disk read on faith
    p.busy_s, p.read_s = 0.010, 0.005
    for i in range(3 * Predictor.min_observations):  # cold guesses (no tier holds them) right 7 times in 8
        p.guessed(1, [1, 2], 1, cold=[1] if i % 8 else [2])
        p.observe(1, [1, 2] if i % 8 else [1, 3])
    assert p.cold_precision(1) == 21 / 24
    assert p.precision(1) > 0.8 and p.allow(1, from_disk=True)
    p.busy_s, p.read_s = 0.0001, 0.08    # disk-bound: the lead time hides almost nothing
    assert not p.allow(1, from_disk=True)
    assert Predictor("on").allow(1, from_disk=True)
    with pytest.raises(ValueError, match="on, off or auto"):
        Predictor("sometimes")


def test_budgets_are_checked(oracles):
    store = oracles("mixtral").store("none")
    size, total, k = sizes(store)
    with pytest.raises(BudgetError, match="minimum"):
        Engine(store, ram_budget=k * size - 1)
    with pytest.raises(ValueError, match="vram_budget applies to cuda"):
        Engine(store, vram_budget="1G")
    eng = twin(store, k, 10 ** 9, size)  # the host tier never holds more than the rest
    assert eng.pager.host_capacity == total - k and eng.pager.total_capacity == total
    eng.close()
