"""runtime/split_tuner.py: the decode split's share chosen by measured time per CPU layer, on
synthetic cost curves (the shape the H200 measures: the slower of the CPU's side, falling as
slices leave it, and the copy's side, rising), and through CpuLayers on the CPU twin (every share
the tuner visits gives the all-resident run's logits)."""
import random

import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.split_tuner import SplitTuner


def curve(cpu_per_slice, copy_per_slice, top=16, fixed=0.1):
    """ms per CPU layer with c of top slices on the CPU: max of both sides plus a fixed part."""
    return lambda c: fixed + max(c * cpu_per_slice, (top - c) * copy_per_slice + (0.05 if c < top else 0.0))


def drive(tuner, cost, calls, noise=0.0, rng=None):
    for _ in range(calls):
        c = tuner.c
        t = cost(c)
        tuner.record(c, t * (1 + rng.uniform(-noise, noise)) if noise else t)


@pytest.mark.parametrize("cpu, copy, want", [
    (0.111, 0.225, 11),   # the H200's rates alone (0.89 ms / 8 per CPU slice, 1.8 ms / 8 per copied one)
    (0.111, 10.0, 16),    # a slow link: every slice stays on the CPU
    (0.3, 0.05, None),    # a slow CPU: the descent goes far down
])
def test_tuner_finds_the_fastest_share(cpu, copy, want):
    cost = curve(cpu, copy)
    best = min(range(17), key=lambda c: (cost(c), -c))
    if want is not None:
        assert best == want
    t = SplitTuner(16, samples=5)
    drive(t, cost, 200)
    assert not t.descending and t.best == best and t.c == best, t.report()
    # it stopped two steps past the best (not a full sweep), one when that step was clearly slower,
    # or at 0
    clear = best > 0 and cost(best - 1) > 1.1 * cost(best)
    assert min(t.times) == max(0, best - (1 if clear else 2)), sorted(t.times)


def test_tuner_with_noise_and_a_drift():
    """5% noise: the median of five calls finds the best or a neighbour within 2% of it; when the
    copy gets slower (another user of the link), a recheck moves the best back towards the CPU."""
    rng = random.Random(1)
    cost = curve(0.111, 0.225)
    t = SplitTuner(16, samples=5, recheck=50)
    drive(t, cost, 300, noise=0.05, rng=rng)
    assert cost(t.best) <= 1.02 * min(cost(c) for c in range(17)), t.report()
    slow = curve(0.111, 0.45)  # the link at half speed: best 13 of 16
    drive(t, slow, 3000, noise=0.05, rng=rng)
    assert t.moves > 0 and slow(t.best) <= 1.02 * min(slow(c) for c in range(17)), t.report()
    assert set(t.report()) == {"best", "descending", "moves", "ms_by_share", "median_ms_by_share"}


def test_tuner_holds_its_best_through_bursts():
    """Disturbances only add time and come in bursts (the H200: a share's median at 8 ms where its
    other calls took 1.8): whole experts (top 2; 1 on the CPU 15% slower, 0 twice as slow) with
    bursts of three calls stretched fourfold in every ten keep the best at 2 (a median of five
    would move to 1 whenever a burst fell in the best's window and not in the neighbour's), and
    the clearly slower step ends the descent without measuring 0."""
    cost = {2: 1.8, 1: 2.1, 0: 3.7}
    t = SplitTuner(2, samples=5, recheck=20)
    for i in range(2000):
        c = t.c
        t.record(c, cost[c] * (4.0 if i % 10 < 3 else 1.0))
    assert t.best == 2 and t.moves == 0 and 0 not in t.times, t.report()


def test_tuner_ignores_stale_shares_and_bad_sizes():
    t = SplitTuner(4, samples=2)
    t.record(1, 5.0)  # a share not in use: kept, decides nothing
    assert t.c == 4 and t.descending and t.median_of(1) == 5.0
    with pytest.raises(ValueError, match="top"):
        SplitTuner(0)


def test_tuned_split_on_the_twin(oracles):
    """CpuLayers with a tuner on the CPU twin (the stand-in GPU: the CPU backend and a host ring):
    decode feeds it one CPU layer's time per call and uses its share; with one sample per share
    it visits several shares within a few tokens (the split among them), and every token's logits
    are the all-resident run's."""
    from flashmoe_plugin.io import aligned_empty
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(7)
    ids, steps = torch.randint(3, 384, (10,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    ref_eng = Engine(store, prefetch="off")
    ref = run_sequence(ref_eng, ids, steps)
    size, k = ref_eng.pager.record_size, ref_eng.config.top_k
    ref_eng.close()
    eng = Engine(store, n_cpu_moe=len(ref_eng.store.layers), ram_budget=k * size, prefetch="off")
    cl = eng.cpu_layers
    cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=1.0, cpu_s=1.0)
    top = k * cl.cut[cl.layers[0]][0]
    tuner = SplitTuner(top, samples=1, recheck=2)
    cl.tuners = {top: tuner}
    out = run_sequence(eng, ids, steps)
    eng.close()
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    # the descent (one sample per share) moved experts to the GPU and ended within a few calls;
    # which shares' times are still held depends on where in a recheck the run stops
    assert cl.split_up > 0 and not tuner.descending, tuner.report()
    assert cl.plan_of(k)["tuner"]["best"] == tuner.best


def test_tuner_drops_its_warmup():
    """The first `warmup` samples (an engine's first token, slow whatever the share) decide nothing."""
    t = SplitTuner(4, samples=1, warmup=3)
    for _ in range(3):
        t.record(4, 100.0)
    assert t.times == {} and t.c == 4
    t.record(4, 1.0)
    assert t.median_of(4) == 1.0 and t.c == 3


def test_cpu_calibration_reads_fresh_records(oracles):
    """CpuLayers.measure_cpu times calls on records no earlier call read (decode reads each token's
    experts from RAM; the same records again stay in a large L3, and the H200's calibration came out
    at half decode's cost): no record is in two of its calls when the layers hold enough of them."""
    from flashmoe_plugin.io import aligned_empty
    store = oracles("mixtral").store("q4")
    eng = Engine(store, n_cpu_moe=len(Engine(store, prefetch="off").store.layers), prefetch="off")
    cl = eng.cpu_layers
    cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=1.0, cpu_s=1.0)
    total = sum(cl.experts[layer] for layer in cl.layers)
    calls, moe = [], cl.backend.moe

    def spy(x, recs, ws, lay):
        calls.append({(r.data_ptr() - cl.mem.data_ptr()) // cl.stride for r in recs})  # the records read
        return moe(x, recs, ws, lay)
    cl.backend.moe = spy
    try:
        cl.measure_cpu()
    finally:
        cl.backend.moe = moe
    eng.close()
    assert total >= 4 * (1 + cl.k) and len(calls) == 8, (total, len(calls))
    seen = [r for c in calls for r in c]
    assert len(seen) == len(set(seen)) == 4 * (1 + cl.k), calls
    assert cl.cpu_s > 0 and cl.cpu_o >= 0
