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
        p.cold[d] = [9, 10]                  # the cold guesses too
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


def test_guess_margins_are_the_router_logit_gaps(oracles):
    eng = Engine(oracles("mixtral").store(), prefetch="off")
    try:
        m, js, k = eng.model, eng._moe_order, eng.config.top_k
        h = torch.randn(1, eng.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(eng.dtype)
        ids, margins = m.guess_scored(js, h)
        assert ids == m.guess_many(js, h)
        hf = h[-1].float()
        n = hf * torch.rsqrt(hf.square().mean() + eng.config.rms_norm_eps)
        for j, got, gaps in zip(js, ids, margins):
            logits = m._guess_router(j).float() @ (n * m.w[f"layers.{j}.ffn_norm.weight"].float())
            left_out = logits.sort(descending=True).values[k]
            assert gaps == pytest.approx([(logits[e] - left_out).item() for e in got], abs=1e-4)
            assert min(gaps) >= 0
    finally:
        eng.close()


def test_cold_guesses_are_judged_by_their_margin_class():
    p = Predictor("auto")
    confident, unsure = 3.0, 0.2  # margin classes ">=2" and "<0.5"
    for i in range(4 * Predictor.min_observations):
        # layer 10 guessed 3 layers ahead: expert 1 confidently (right 7 times in 8), expert 5
        # unsure (right 1 time in 4); both cold
        p.guessed(10, [1, 5], 3, cold=[1, 5], margins=[confident, unsure])
        p.observe(10, [1 if i % 8 else 2, 5 if i % 4 == 0 else 6])
    p.busy_s, p.read_s = 0.011, 0.070  # (observe measured the busy time of this loop)
    assert p.cold_precision(3) == pytest.approx(0.5625)  # all cold guesses: 0.5625 < 70 / (70 + 33)
    assert not p.allow(3, True)
    assert p.cold_precision(3, confident) == 7 / 8 and p.allow(3, True, confident)
    assert p.cold_precision(3, unsure) == 1 / 4 and not p.allow(3, True, unsure)
    # a class not graded at distance 2 borrows from the farther distances (here distance 3)
    assert p.cold_precision(2, confident) == 7 / 8
    snap = p.snapshot()["by_distance"][3]["cold_by_margin"]
    assert snap == {"<0.5": [8, 32], ">=2.0": [28, 32]}
