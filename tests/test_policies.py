"""Pager policies: Belady's simulator against an exhaustive optimum, no online policy above it,
the pager against the simulator, and logits identical for every policy and budget."""
import random
import shutil

import pytest
import torch

from flashmoe_plugin.pager.belady import belady, brute_force, simulate
from flashmoe_plugin.pager.policies import FWLRU, LFU, LRU, LayerLRFU, Static
from flashmoe_plugin.pager.trace import RoutingTrace, load_routing_stats, write_routing_stats
from flashmoe_plugin.plugins import registry
from flashmoe_plugin.runtime.engine import Engine
from conftest import run_sequence

ONLINE = {"lru": LRU, "lfu": LFU, "fwlru": FWLRU, "lrfu": LayerLRFU}


def random_trace(rng, n_layers, n_experts, k, n_steps):
    return [[(layer, e) for e in rng.sample(range(n_experts), rng.randint(1, k))]
            for _ in range(n_steps) for layer in range(n_layers)][:n_steps]


def pinned_static(capacity, pins):
    s = Static(capacity)
    s.pinned = {key: 1 for key in pins}
    return s


def test_policies_registered():
    assert {"lru", "lfu", "fwlru", "static", "belady"} <= set(registry().policies)


def test_belady_matches_brute_force_and_beats_online_policies():
    rng = random.Random(1234)
    for _ in range(250):
        n_layers, n_experts, k = rng.choice([1, 2]), rng.choice([3, 4, 5]), rng.choice([1, 2, 3])
        reqs = random_trace(rng, n_layers, n_experts, k, rng.randint(2, 9))
        cap = rng.randint(max(len(r) for r in reqs), n_layers * n_experts)
        best = brute_force(reqs, cap)
        assert belady(reqs, cap).hits == best, (reqs, cap)
        for name, cls in ONLINE.items():
            assert simulate(cls(cap), reqs, cap).hits <= best, name
        used = sorted({key for r in reqs for key in r})
        pins = rng.sample(used, k=max(0, min(cap - max(len(r) for r in reqs), 2, len(used))))
        assert simulate(pinned_static(cap, pins), reqs, cap).hits <= best


def reference_hits(name, requests, cap):
    """Each online policy from its definition, with no shared code: hits of a request are touched
    in order, each miss evicts (outside the request) when full, misses load after the hits."""
    import math
    resident, count, last, f, t = [], {}, {}, {}, 0
    lam = math.log(2) / max(1.0, cap)

    def use(k):
        nonlocal t
        t += 1
        fk, tl = f.get(k, (0.0, t))
        f[k] = (fk * math.exp(-lam * (t - tl)) + 1.0, t)
        count[k] = count.get(k, 0) + 1
        last[k] = t

    rank = {"lru": lambda k: last[k], "lfu": lambda k: (count[k], last[k]),
            "fwlru": lambda k: (math.log(f[k][0]) + lam * f[k][1], f[k][1])}[name]
    hits = 0
    for req in requests:
        req = list(dict.fromkeys(req))
        loaded = []
        for k in req:
            if k in resident:
                hits += 1
                use(k)
                continue
            if len(resident) + len(loaded) >= cap:
                resident.remove(min((r for r in resident if r not in req), key=rank))
            loaded.append(k)
        for k in loaded:
            resident.append(k)
            use(k)
    return hits


def reference_lrfu_hits(requests, cap, half_life=LayerLRFU.half_life):
    """lrfu from its definition: counts decayed by the key's own layer's visits (a visit starts at
    the layer's first access, or eviction for it, after another layer's); the victim is the lowest
    log score ln f - (t_layer - t_last) ln2/H over all layers, ties to the most recently visited
    layer (the request's own first), within a layer by (score at last use, last use, expert)."""
    import math
    lam = math.log(2) / half_life
    resident, f, t, seen = [], {}, {}, {}
    state = {"last": None, "visits": 0}

    def visit(layer):
        if layer != state["last"]:
            t[layer] = t.get(layer, 0) + 1
            state["last"], state["visits"] = layer, state["visits"] + 1
            seen[layer] = state["visits"]

    def use(k):
        visit(k[0])
        fk, tl = f.get(k, (0.0, t[k[0]]))
        f[k] = (fk * math.exp(-lam * (t[k[0]] - tl)) + 1.0, t[k[0]])

    hits = 0
    for req in requests:
        req = list(dict.fromkeys(req))
        loaded = []
        for k in req:
            if k in resident:
                hits += 1
                use(k)
                continue
            if len(resident) + len(loaded) >= cap:
                cur = req[0][0]
                visit(cur)
                cands = [r for r in resident if r not in req]
                best = {}
                for r in cands:  # each layer's lowest, then across layers
                    key = (math.log(f[r][0]) + lam * f[r][1], f[r][1], r[1])
                    if r[0] not in best or key < best[r[0]][0]:
                        best[r[0]] = (key, r)
                victim = min(best.values(), key=lambda kr: (round(kr[0][0] - lam * t[kr[1][0]], 9),
                                                             -math.inf if kr[1][0] == cur else -seen[kr[1][0]]))[1]
                resident.remove(victim)
            loaded.append(k)
        for k in loaded:
            resident.append(k)
            use(k)
    return hits


def test_online_policies_hit_exactly_what_their_definitions_give():
    rng = random.Random(4321)
    for _ in range(250):
        n_layers, n_experts, k = rng.choice([1, 2]), rng.choice([3, 4, 5, 8]), rng.choice([1, 2, 3])
        reqs = random_trace(rng, n_layers, n_experts, k, rng.randint(2, 30))
        cap = rng.randint(max(len(r) for r in reqs), n_layers * n_experts)
        for name, cls in ONLINE.items():
            want = reference_lrfu_hits(reqs, cap) if name == "lrfu" else reference_hits(name, reqs, cap)
            assert simulate(cls(cap), reqs, cap).hits == want, (name, reqs, cap)


def test_belady_protects_the_current_request():
    # plain sequential MIN would evict (0, 0) while loading (0, 1) in the same step
    reqs = [[(0, 0)], [(0, 1), (0, 0)], [(0, 2)], [(0, 0)]]
    assert belady(reqs, 2).hits == brute_force(reqs, 2) == 2
    with pytest.raises(ValueError, match="capacity"):
        belady([[(0, 0), (0, 1), (0, 2)]], 2)


def test_fwlru_keeps_a_frequent_expert_through_a_burst():
    hot = (0, 0)
    reqs = [[hot]] * 6 + [[(0, 1)], [(0, 2)], [(0, 3)], [hot]]
    assert simulate(LRU(3), reqs, 3).hits_per_request[-1] == 0
    assert simulate(FWLRU(3), reqs, 3).hits_per_request[-1] == 1


def test_static_never_evicts_pins_in_decode_and_falls_back_when_it_must():
    s = pinned_static(4, [(0, 0), (1, 0)])
    reqs = [[(0, e), (1, e)] for e in (1, 2, 3, 4, 5)] * 2
    r = simulate(s, reqs, 4, preload=[(0, 0), (1, 0)])
    assert set(s.pinned) == {(0, 0), (1, 0)} and r.misses > 0
    # a step needing more than the unpinned slots unpins the coldest pin instead of failing
    s = pinned_static(3, [(0, 0), (0, 1)])
    simulate(s, [[(0, 2), (0, 3), (0, 4)]], 3, preload=[(0, 0), (0, 1)])
    assert s.pinned == {}


def test_trace_and_routing_stats_files(tmp_path):
    t = RoutingTrace()
    t.begin(0, 3)
    t.route(0, torch.tensor([[1, 2], [2, 3], [1, 0]]))
    t.request(0, [1, 2, 3, 0])
    t.begin(3, 1)
    t.route(0, torch.tensor([[2, 1]]))
    t.request(0, [2, 1, 2])
    t.save(tmp_path / "t.npz")
    u = RoutingTrace.load(tmp_path / "t.npz")
    assert u.request_keys() == [[(0, 1), (0, 2), (0, 3), (0, 0)], [(0, 2), (0, 1)]]
    layer, pos, ids = u.routes()
    assert pos.tolist() == [0, 1, 2, 3] and ids.tolist()[3] == [2, 1] and u.tokens() == 4
    assert u.counts(4)[0].tolist() == [1, 3, 3, 1]
    write_routing_stats(tmp_path, u.counts(4), u.tokens(), 2, 4)
    assert load_routing_stats(tmp_path)["counts"] == {0: [1, 3, 3, 1]}
    (tmp_path / "routing_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="routing_stats.json"):
        load_routing_stats(tmp_path)


def test_logits_identical_for_every_policy_and_budget(profiled):
    store, ids, steps, ref = profiled
    probe = Engine(store)
    size, total, k = probe.pager.record_size, probe.pager.capacity, probe.config.top_k
    probe.close()
    for cap in sorted({k, max(k, total * 2 // 5), total}):
        hits = {}
        for policy in ("lru", "lfu", "fwlru", "lrfu", "auto", "static", "belady"):
            eng = Engine(store, ram_budget=cap * size, policy=policy, prefetch="off")
            trace = RoutingTrace()
            eng.record(trace)
            out = run_sequence(eng, ids, steps)
            eng.close()
            assert torch.equal(out, ref), (policy, cap)
            s = eng.pager.stats
            hits[policy] = s.hits
            reqs = trace.request_keys()
            if policy in ONLINE:  # the pager behaves exactly like the simulator
                assert s.hits == simulate(ONLINE[policy](cap), reqs, cap).hits
            if policy == "belady":  # replaying the recorded trace is the offline optimum
                assert s.hits == belady(reqs, cap).hits
            if policy == "static":  # pins come from routing_stats.json (never more than it holds)
                assert s.preloaded >= len(eng.pager.policy.pinned) and s.preloaded <= cap - k
                assert (s.preloaded > 0) == (cap > k + 1)
        assert all(hits["belady"] >= hits[p] for p in ONLINE), hits


def test_static_without_stats_is_lru(oracles, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(oracles("mixtral").store("none"), store)
    with pytest.warns(UserWarning, match="running as LRU"):
        eng = Engine(store, policy="static")
    assert "LRU" in eng.pager.policy.note and eng.pager.stats.preloaded == 0
    eng.close()
    with pytest.raises(ValueError, match="flashmoe profile"):
        Engine(store, policy="belady")


def test_lrfu_on_a_hand_worked_layer_cycle():
    # three layers, one expert each, two slots: every request is one layer's visit. LRU always
    # evicts the layer that runs next (0 hits); lrfu keeps (0, 0), whose count grows, and among equal
    # scores drops the most recently visited layer's key (farthest next use): 1 hit per cycle from
    # the second; Belady's MIN reaches one hit in two requests.
    reqs = [[(layer, 0)] for _ in range(10) for layer in range(3)]
    assert simulate(LRU(2), reqs, 2).hits == 0
    lrfu = simulate(LayerLRFU(2), reqs, 2)
    assert lrfu.hits_per_request == [0, 0, 0] + [1, 0, 0] * 9
    assert belady(reqs, 2).hits == 14


def test_lrfu_never_thrashes_on_uniform_routing():
    # 32 layers x 8 experts, top-2, uniform and independent (the synth stores' routing): no online
    # policy can expect more than capacity / records; LRU and fwlru fall to ~0 below one token's
    # 64 records, lrfu (and auto) stay near the bound at every capacity
    rng = random.Random(0)
    reqs = [[(layer, e) for e in rng.sample(range(8), 2)] for _ in range(120) for layer in range(32)]
    for cap in (25, 64, 128, 192):
        bound = cap / 256
        for name in ("lrfu", "auto"):
            hr = simulate(registry().policies[name](cap), reqs, cap).hit_rate
            assert hr >= 0.8 * bound, (name, cap, hr)
        assert hr <= belady(reqs, cap).hit_rate
    assert simulate(LRU(25), reqs, 25).hit_rate < 0.01 and simulate(FWLRU(25), reqs, 25).hit_rate < 0.01
