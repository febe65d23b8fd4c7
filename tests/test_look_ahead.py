"""The deep look-ahead of the prefetch predictor (issue 10): the batched guess agrees with the
exact one, the lead rule picks how far to look, and a newer guess replaces an older prefetch.

Oracles: Model.guess (the router run exactly as routing runs it) for the batched guess; the
predictor's formula evaluated by hand; the pager's own bookkeeping for replaced reads."""
import pytest
import torch

from flashmoe_plugin.pager.pager import DEMAND
from flashmoe_plugin.pager.predictor import Predictor
from flashmoe_plugin.runtime.engine import Engine


def test_batched_guess_matches_the_exact_router(oracles, family):
    eng = Engine(oracles(family).store(), prefetch="off")
    try:
        m, js = eng.model, eng._moe_order
        gen = torch.Generator().manual_seed(0)
        agree = total = 0
        for _ in range(8):
            h = torch.randn(1, eng.config.hidden_size, generator=gen).to(eng.dtype)
            fast = m.guess_many(js, h)
            assert len(fast) == len(js)
            for j, got in zip(js, fast):
                exact = m.guess(j, h)
                assert len(got) == len(exact) == eng.config.top_k
                agree += set(got) == set(exact)
                total += 1
        # ties between fp32 and the ggml-exact norm may flip a near-equal pair, nothing more
        assert agree >= 0.97 * total, (family, agree, total)
    finally:
        eng.close()


def test_the_lead_rule_picks_the_depth():
    p = Predictor("auto")            # default: up to 8 layers for disk reads, 1 for copies
    assert (p.depth, p.host_depth) == (8, 1)
    assert p.reach() == 1            # nothing measured yet
    p.busy_s, p.read_s = 0.011, 0.070
    assert p.reach() == 7            # 6 x 11 ms < 70 ms <= 7 x 11 ms
    for d in range(1, 9):
        p.by_distance[d] = [9, 10, 10, 10]   # precision 0.9, graded enough
    assert [p.allow(d, True) for d in range(1, 9)] == [True] * 7 + [False]
    assert [p.allow(d, False) for d in range(1, 3)] == [True, False]
    p.read_s = 0.005                 # a fast disk: one layer already hides a read
    assert p.reach() == 1 and not p.allow(2, True)
    q = Predictor("auto", depth=3)   # an explicit depth caps both, as before
    assert (q.depth, q.host_depth) == (3, 3)
    q.busy_s, q.read_s = 0.011, 0.070
    assert q.reach() == 3


def test_a_newer_guess_replaces_the_older_prefetch(oracles):
    store = oracles("mixtral").store()
    probe = Engine(store, prefetch="off")
    size, k = probe.pager.record_size, probe.config.top_k
    probe.close()
    # io_threads=0: reads run only when waited for, so the first guess is still in flight
    eng = Engine(store, ram_budget=3 * k * size, prefetch="off", io_threads=0)
    try:
        p = eng.pager
        layer = eng._moe_order[-1]
        assert p.prefetch(layer, [0, 1], priority=-3) == 2
        assert {key for key in p.reads} == {(layer, 0), (layer, 1)}
        assert p.prefetch(layer, [1, 2], priority=-2, replace=True) == 1
        assert set(p.reads) == {(layer, 1), (layer, 2)}
        assert p.stats.prefetch_cancelled == 1
        with pytest.raises(ValueError, match="priority"):
            p.prefetch(layer, [3], priority=DEMAND)
        got = dict(p.request(layer, [1, 2]))   # both prefetches claimed by demand
        assert set(got) == {1, 2} and p.stats.prefetch_used == 2
        assert not p.cancelling and not p.reads
        # the cancelled read's slot came back: every slot is resident or free
        assert len(p.t0) + len(p.t0.free) == p.capacity
    finally:
        eng.close()
