"""Hybrid CPU+GPU experts on the CPU twin (four families): `n_cpu_moe` layers computed from RAM,
host-tier records split between copy and compute by the cost model. Oracle: the logits of the
all-resident run on the same store (same kernels, another summation order: tolerance 1e-5)."""
import types

import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.host_compute import HostCompute, physical_cores


def device_step_layers(store, family) -> int:
    """The store's MoE layer count; skips where the device step does not implement the family."""
    from flashmoe_plugin.runtime.graph_decode import unsupported
    probe = Engine(store, prefetch="off")
    why, n_moe = unsupported(probe), len(probe.store.layers)
    probe.close()
    if why:
        pytest.skip(f"the device step does not implement {family}'s {why}")
    return n_moe


def reference(store, ids, steps):
    eng = Engine(store, prefetch="off")
    out = run_sequence(eng, ids, steps)
    size, total, k = eng.pager.record_size, eng.pager.capacity, eng.config.top_k
    eng.close()
    return out, size, total, k


def test_n_cpu_moe_matches_the_all_resident_run(oracles, family):
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(3, 384, (20,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    n_moe = len(Engine(store, prefetch="off", ram_budget=k * size).store.layers)
    for n in sorted({1, n_moe}):
        eng = Engine(store, n_cpu_moe=n, ram_budget=k * size, prefetch="off")
        out = run_sequence(eng, ids, steps)
        p = eng.pager
        eng.close()
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, n, (out - ref).abs().max())
        assert eng.cpu_layers.layers == sorted(eng.store.layers)[:n]
        # the CPU layers never go through the pager: it saw only the other layers
        assert {key[0] for key in p.t0.slot_of}.isdisjoint(eng.cpu_layers.layers)
    with pytest.raises(ValueError, match="n_cpu_moe"):
        Engine(store, n_cpu_moe=n_moe + 1)


def test_n_cpu_moe_through_the_device_step(oracles, family, monkeypatch):
    # the device decode step (its CPU twin) with n_cpu_moe layers (runtime/hybrid_decode.py): the
    # token runs in segments cut at each CPU layer's experts, which the host computes between
    # two segments (here split with a stand-in "GPU": the CPU backend and a host ring); the
    # logits are the all-resident run's, and no step falls back
    from flashmoe_plugin.io import aligned_empty
    from flashmoe_plugin.runtime.hybrid_decode import HybridDecode
    monkeypatch.setenv("FLASHMOE_SLICE_EXPERTS", "1")  # slices on (opt-in), the test models' experts in 2
    monkeypatch.setattr("flashmoe_plugin.store.slices.SMALLEST", 64)
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(3, 384, (12,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    n_moe = device_step_layers(store, family)
    for n, split in ((1, False), (min(2, n_moe), True), (n_moe, True)):
        eng = Engine(store, n_cpu_moe=n, ram_budget=total * size, prefetch="off", decode_graph="on")
        cl = eng.cpu_layers
        if split:
            cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=0.5, cpu_s=1.0)
        out = [eng.forward(ids)]
        for layer in sorted(set(eng.store.layers) - set(cl.layers)):  # no first-use misses
            list(eng.pager.request(layer, list(range(eng.config.num_experts))))
        out = torch.cat(out + [eng.forward([t]) for t in steps])
        fast = eng.fast
        eng.close()
        assert isinstance(fast, HybridDecode) and fast.cpu == cl.layers
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, n, (out - ref).abs().max())
        assert fast.steps == len(steps) and fast.fallbacks == 0, (fast.steps, fast.fallbacks)
        assert (cl.split_up > 0) == (split and k > 1), (n, cl.split_up)
        # sliced once the "GPU" is attached: the test models' experts in 2 (gpt-oss's, with biases, stay whole)
        assert cl.cut[cl.layers[0]][0] == (2 if split and eng.model.expert_act is None else 1), cl.cut


def test_copy_or_compute_split_by_measured_costs(oracles, family):
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(4)
    ids, steps = torch.randint(3, 384, (16,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    for copy_s, cpu_s in ((1.0, 1.0), (1.0, 1e9), (1e9, 1.0)):
        eng = Engine(store, ram_budget=k * size, pager_options={"host_budget": (total // 2) * size},
                     prefetch="off", host_compute="on")
        hc = eng.host_compute
        hc.mode, hc.copy_s, hc.cpu_s = "auto", copy_s, cpu_s  # the cost model with given costs
        out = run_sequence(eng, ids, steps)
        s = eng.pager.stats
        eng.close()
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, copy_s, cpu_s)
        if cpu_s > copy_s:  # every host record copied up
            assert s.host_computed == 0 and s.host_hits > 0
        else:  # decode steps compute some (equal costs: half, rounded up) or all of them here
            assert 0 < s.host_computed <= s.host_hits


def test_share_balances_copy_and_compute():
    hc = HostCompute.__new__(HostCompute)
    hc.mode, hc._pager = "auto", types.SimpleNamespace(t0=[], capacity=1)  # a free slot: copies cost copy_s
    hc.copy_s, hc.cpu_s = 1.0, 3.0     # copies 3x cheaper: of 8 records the CPU takes 2 (ties go to the CPU)
    assert [hc.share(m) for m in range(0, 9)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    hc.copy_s, hc.cpu_s = 2.0, 1.0     # CPU 2x cheaper: 2 of 3 on the CPU
    assert hc.share(3) == 2 and hc.pays()
    hc.mode = "off"
    assert hc.share(5) == 0
    from flashmoe_plugin.runtime.host_compute import cpu_share
    # a fixed CPU-side overhead (its host time beyond the kernels) moves a piece to the copy
    assert cpu_share(16, 0.225, 0.184) == 9 and cpu_share(16, 0.225, 0.184, 0.3) == 8
    assert physical_cores() >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch (none on this machine)")
@pytest.mark.parametrize("n_cpu", [1, "all"])
def test_n_cpu_moe_on_the_gpu(oracles, family, n_cpu, monkeypatch):
    """Dense part on the GPU, the first layers' experts on the CPU: the GPU engine's all-resident
    logits within the fp32-vs-native-kernel tolerance of test_cuda_pager (2e-2 for q4). n_cpu 1
    with expert slices (the test models' experts in 2) and the cost model's share, "all" with the
    defaults (whole experts; the share by runtime/split_tuner.py)."""
    if n_cpu == 1:
        monkeypatch.setenv("FLASHMOE_SLICE_EXPERTS", "1")
        monkeypatch.setattr("flashmoe_plugin.store.slices.SMALLEST", 64)
    else:
        monkeypatch.delenv("FLASHMOE_SLICE_EXPERTS", raising=False)
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(3, 384, (20,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    full = Engine(store, device="cuda", dtype=torch.float32, ram_budget=0, prefetch="off")
    ref = run_sequence(full, ids, steps)
    n = len(full.store.layers) if n_cpu == "all" else n_cpu
    full.close()
    eng = Engine(store, device="cuda", dtype=torch.float32, ram_budget=0, prefetch="off", n_cpu_moe=n)
    cl = eng.cpu_layers
    if n_cpu == 1:  # the measured Mixtral costs: one expert split between the CPU and the GPU at a slice
        cl.copy_s, cl.cpu_s, cl.cpu_o, cl.alone, cl._adapt = 1.8, 1.1, 0.0, None, False
    out = run_sequence(eng, ids, steps)
    fast = eng.fast
    segments = len(fast.graphs) if fast is not None else None
    eng.close()
    assert (out - ref).abs().max() < 2e-2, (family, n)
    # the device step, when it implements the family: segments captured (runtime/hybrid_decode.py)
    assert fast is None or segments == n + 1, (family, segments, fast.why_not)
    assert cl.split_up > 0 or n_cpu != 1 or eng.config.top_k == 1 or eng.model.expert_act is not None
    assert cl.cut[cl.layers[0]][0] == (2 if n_cpu == 1 and eng.model.expert_act is None else 1), cl.cut


@pytest.mark.parametrize("copy_s,cpu_s", [(0.5, 1.0), (1.8, 1.1)])
def test_n_cpu_moe_prefill_copied_up_twin(oracles, family, copy_s, cpu_s, monkeypatch):
    """The GPU side of CpuLayers on the CPU twin: the engine's own backend stands for the GPU's
    and host memory for its ring of slots; costs set so that every prefill expert is copied up
    (through the ring, several copies ahead and into the next CPU layer) and a decode token's
    experts are shared by CpuLayers.plan between the CPU and the "GPU", cut at a slice of their
    intermediate rows ((1.8, 1.1) are the H200's measured Mixtral costs: one expert's tail goes up)."""
    from flashmoe_plugin.io import aligned_empty
    monkeypatch.setenv("FLASHMOE_SLICE_EXPERTS", "1")  # slices on (opt-in), the test models' experts in 2
    monkeypatch.setattr("flashmoe_plugin.store.slices.SMALLEST", 64)
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(3, 384, (20,), generator=g).tolist(), torch.randint(3, 384, (4,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    n_moe = len(Engine(store, prefetch="off", ram_budget=k * size).store.layers)
    eng = Engine(store, n_cpu_moe=min(2, n_moe), ram_budget=k * size, prefetch="off")
    cl = eng.cpu_layers
    cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=copy_s, cpu_s=cpu_s)
    q = cl.cut[cl.layers[0]][0]
    c = cl.plan(k, q)
    assert 0 < c < k * q or k == 1, (c, k, q)
    sliced = eng.model.expert_act is None  # gpt-oss's experts (biases) stay whole
    assert (q > 1) == sliced, q
    out = run_sequence(eng, ids, steps)
    eng.close()
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, (out - ref).abs().max())
    assert cl.copied_up > 0
    # the split is for plain SwiGLU experts (one fused call each side); gpt-oss's go up whole
    assert cl.split_up > 0 or k == 1 or not sliced


def test_costs_follow_the_decode_twin(oracles):
    """The split's costs as a GPU run keeps them, on the CPU twin: CpuLayers.measure_cpu (the CPU's
    cost affine in a call's experts, from one- and k-expert calls), then decode scaling both terms by
    its own C calls and adding its host time; the costs stay positive and finite, the decode still
    splits, and the logits are the all-resident run's."""
    import math

    from flashmoe_plugin.io import aligned_empty
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(6)
    ids, steps = torch.randint(3, 384, (12,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    eng = Engine(store, n_cpu_moe=2, ram_budget=k * size, prefetch="off")
    cl = eng.cpu_layers
    cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=1.0, cpu_s=1.0)
    cl.measure_cpu()
    assert cl.cpu_s > 0 and cl.cpu_o >= 0 and cl.cpu_s + cl.cpu_o > 0, (cl.cpu_s, cl.cpu_o)
    # one expert's copy dearer than the CPU's call for one, cheaper than for two: the first tokens split
    cl.copy_s, cl._adapt = cl.cpu_o + 1.5 * cl.cpu_s, True
    out = run_sequence(eng, ids, steps)
    eng.close()
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    assert all(math.isfinite(v) and v >= 0 for v in (cl.cpu_s, cl.cpu_o, cl._host_o)) and cl.cpu_s > 0
    assert cl.cpu_o >= cl._host_o > 0 and cl.split_up > 0  # the host's own time is counted


def test_slices_sum_to_the_expert(oracles, family):
    """store/slices.py: an expert's q slices (each a record of intermediate I/q) sum to the
    expert, through the C kernels and the torch reference alike."""
    from flashmoe_plugin import kernels
    from flashmoe_plugin.store.format import Store
    from flashmoe_plugin.store.slices import cut, slice_count, slice_layout
    st = Store.open(oracles(family).store("q4"))
    layer = sorted(st.layers)[0]
    lay = st.layout_of(layer)
    q = slice_count(lay, st.config.top_k, want=4, smallest=64)
    if q == 1:
        assert lay.has("b2"), "only experts with biases stay whole here"
        pytest.skip(f"{family}: experts with biases are not sliced")
    rec = torch.zeros(lay.size, dtype=torch.uint8)
    for f, off, nbytes, into, _ in st.record_reads(layer, 1):
        with open(f, "rb") as fh:
            fh.seek(off)
            rec[into:into + nbytes] = torch.frombuffer(bytearray(fh.read(nbytes)), dtype=torch.uint8)
    sub = slice_layout(lay, q)
    dst = torch.zeros(q * sub.size, dtype=torch.uint8)
    cut(rec, lay, q, dst)
    x = torch.randn(3, lay.hidden, generator=torch.Generator().manual_seed(1))
    for name in ("cpu", "torch"):
        be = kernels.select("cpu", name)
        want = be.expert_ffn(x, rec, lay)
        got = sum(be.expert_ffn(x, dst[j * sub.size:(j + 1) * sub.size], sub) for j in range(q))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (family, name, q, (got - want).abs().max())
    with pytest.raises(ValueError, match="slices need"):
        cut(rec, lay, q, dst[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch (none on this machine)")
def test_sliced_expert_on_the_gpu(oracles):
    """CudaBackend.moe (a sliced expert's prefill in CpuLayers): an expert's slices summed on the
    GPU, for few tokens (one fused call) and many (one dequantized stack, two GEMMs), equal the
    whole expert through the torch reference (fp32; the GPU's activations pass through 16 bits)."""
    from flashmoe_plugin import kernels
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.store.format import Store
    from flashmoe_plugin.store.slices import cut, slice_layout
    st = Store.open(oracles("mixtral").store("q4"))
    layer = sorted(st.layers)[0]
    lay = st.layout_of(layer)
    rec = torch.zeros(lay.size, dtype=torch.uint8)
    for f, off, nbytes, into, _ in st.record_reads(layer, 1):
        with open(f, "rb") as fh:
            fh.seek(off)
            rec[into:into + nbytes] = torch.frombuffer(bytearray(fh.read(nbytes)), dtype=torch.uint8)
    q = 2
    sub = slice_layout(lay, q)
    dst = torch.zeros(q * sub.size, dtype=torch.uint8)
    cut(rec, lay, q, dst)
    pieces = [dst[j * sub.size:(j + 1) * sub.size].cuda() for j in range(q)]
    gpu = CudaBackend()
    for T in (3, 40):
        x = torch.randn(T, lay.hidden, generator=torch.Generator().manual_seed(T))
        want = kernels.select("cpu", "torch").expert_ffn(x, rec, lay) * 0.75
        got = gpu.moe(x.cuda(), pieces, [0.75] * q, sub).cpu()
        assert (got - want).abs().max() < 2e-2 * want.abs().max(), (T, (got - want).abs().max(), want.abs().max())


def test_slices_are_opt_in(oracles, monkeypatch):
    """On the CPU twin the records stay whole when the GPU side is attached unless
    FLASHMOE_SLICE_EXPERTS=1, and the plan cuts at whole experts."""
    from flashmoe_plugin.io import aligned_empty
    monkeypatch.delenv("FLASHMOE_SLICE_EXPERTS", raising=False)
    monkeypatch.setattr("flashmoe_plugin.store.slices.SMALLEST", 64)
    eng = Engine(oracles("mixtral").store("q4"), n_cpu_moe=1, prefetch="off")
    cl = eng.cpu_layers
    cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=1.8, cpu_s=1.1)
    eng.close()
    assert cl.stride == eng.store.layout.size and cl.cut[cl.layers[0]][0] == 1
    assert cl.plan_of(2) == {"slices_per_expert": 1, "slices_on_cpu": 1, "of": 2}


def test_plan_balances_pcie_and_cpu():
    """CpuLayers.plan on the H200's measured Mixtral costs (copy 1.8 ms, CPU 1.1 ms per expert):
    whole experts give max(1.8, 1.1); 8 slices per expert give the CPU one expert and a quarter
    of the other (1.375 ms) and the copy the rest (1.35 ms)."""
    from flashmoe_plugin.runtime.cpu_layers import CpuLayers
    cl = CpuLayers.__new__(CpuLayers)
    cl.gpu, cl.copy_s, cl.cpu_s = object(), 1.8, 1.1
    assert cl.plan(2) == 1  # whole experts: one each side
    assert cl.plan(2, 8) == 10
    cl.copy_s = 100.0  # a slow link: everything here
    assert cl.plan(2, 8) == 16
    cl.copy_s, cl.cpu_s = 1.0, 100.0  # a slow CPU: everything up
    assert cl.plan(2, 8) == 0
    cl.copy_s, cl.cpu_s = 1.0, 1.0  # equal costs: half each side, k = 8 experts of 2 slices
    assert cl.plan(8, 2) == 8
    cl.gpu = None
    assert cl.plan(8) == 8 and cl.plan(2, 8) == 16
    # the CPU alone priced apart ([fixed, per expert, host]): beside the copy one expert took 1.1 ms
    # (contention), alone two take 0.6 + 2 x 0.5 + 0.05: faster than the split's 1.8 ms copy
    cl.gpu, cl.copy_s, cl.cpu_s, cl.cpu_o = object(), 1.8, 1.1, 0.0
    cl.alone = [0.6, 0.5, 0.05]
    assert cl.plan(2) == 2
    cl.alone = [0.6, 0.7, 0.05]  # 2.05 ms alone: the split's 1.8 wins
    assert cl.plan(2) == 1


def test_pool_spin_is_settable():
    """CpuBackend.set_spin_us (CpuLayers sets it beside a GPU) round-trips, and the kernels compute
    the same with the pool's idle workers spinning long or not at all."""
    from flashmoe_plugin import kernels, quant
    from flashmoe_plugin.store.layout import RecordLayout
    be = kernels.select("cpu")
    if not hasattr(be, "set_spin_us"):
        pytest.skip("the C kernels are not built")
    lay = RecordLayout.build("q4", 128, 256)
    rec = torch.randint(0, 256, (lay.size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for sec in ("w13", "w2"):  # finite scales
        p = lay.part(sec)
        for t in quant.views(lay.part_bytes(rec, sec), p.format, p.shape).values():
            if t.dtype.is_floating_point:
                t.copy_(torch.full_like(t, 0.01))
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
    before = be.module.get_spin_us()
    try:
        outs = []
        for us in (0, 5000):
            be.set_spin_us(us)
            assert be.module.get_spin_us() == us
            outs.append(be.moe(x, [rec, rec], [0.5, 0.25], lay))
        assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
    finally:
        be.set_spin_us(before)


def _fused_run(store, n, ids, steps, total, size, fused: bool, monkeypatch):
    from flashmoe_plugin.runtime import hybrid_token
    monkeypatch.setattr(hybrid_token, "TWIN", fused)
    from flashmoe_plugin.pager.trace import RoutingTrace
    eng = Engine(store, n_cpu_moe=n, ram_budget=total * size, prefetch="off", decode_graph="on")
    trace = RoutingTrace()
    eng.record(trace)  # as bench does: the fused token records the CPU layers' routing too
    out = [eng.forward(ids)]
    for layer in sorted(set(eng.store.layers) - set(eng.cpu_layers.layers)):  # no first-use misses
        list(eng.pager.request(layer, list(range(eng.config.num_experts))))
    out = torch.cat(out + [eng.forward([t]) for t in steps])
    fast = eng.fast
    eng.close()
    return out, fast, [[a.tolist() for a in part] for part in (trace._route_layer, trace._route_pos, trace._route_ids)]


def test_n_cpu_moe_fused_token_twin(oracles, family, monkeypatch):
    # runtime/hybrid_token.py on the CPU twin: the token's CPU layers in ONE host call (the C
    # kernels' HybridPlan, GIL released), a thread playing the device through the same flags and
    # rows as the hand-off kernel: the logits equal the segmented path's bit for bit (the same
    # kernels on the same rows) and the all-resident run's within 1e-5
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(6)
    ids, steps = torch.randint(3, 384, (10,), generator=g).tolist(), torch.randint(3, 384, (5,), generator=g).tolist()
    ref, size, total, k = reference(store, ids, steps)
    n_moe = device_step_layers(store, family)
    for n in sorted({1, n_moe}):
        seg, fast0, trace0 = _fused_run(store, n, ids, steps, total, size, False, monkeypatch)
        out, fast, trace = _fused_run(store, n, ids, steps, total, size, True, monkeypatch)
        assert trace == trace0  # the same routing recorded in the same order
        assert fast0.fused is None and fast.fused is not None, fast.fused_why
        assert fast.fused.tokens == len(steps) and fast.fallbacks == 0, (fast.fused.tokens, fast.fallbacks)
        assert torch.equal(out, seg), (family, n, (out - seg).abs().max())
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, n, (out - ref).abs().max())
        # the experts the host call ran are the token's routing (the last token's, per CPU layer)
        assert fast.fused.ids.shape == (n, k) and int(fast.fused.ids.min()) >= 0


def test_hybrid_plan_runs_the_layers_and_releases_the_device_on_errors():
    # the host call alone (csrc/cpu/fm_handoff.c), the device's flags and rows set by hand: each
    # layer's sum equals the C kernels' moe() on the same row; a bad expert id or a row that never
    # comes gives a clear error with every layer's done flag set (the device's waits end)
    from test_cpu_kernels import make_record

    from flashmoe_plugin import _cpu_kernels as K
    from flashmoe_plugin.store.layout import RecordLayout
    torch.manual_seed(7)
    n, E, H, I, k = 3, 4, 192, 320, 2
    lay = RecordLayout.build("q4", H, I)
    spec = K.ExpertSpec.from_layout(lay)
    recs = [[make_record(lay) for _ in range(E)] for _ in range(n)]
    ready, done = torch.zeros(n, 16, dtype=torch.int32), torch.zeros(n, 16, dtype=torch.int32)
    packs, outs = torch.zeros(n, H + 2 * k), torch.full((n, H), 7.0)
    t_ready, got = torch.zeros(n, dtype=torch.int64), torch.zeros(n, k, dtype=torch.int32)
    plan = K.HybridPlan(ready, done, packs, outs, recs, spec, t_ready, got)
    chosen = [[1, 3], [0, 2], [3, 0]]
    for j in range(n):
        packs[j, :H] = torch.randn(H)
        packs[j, H:H + k] = torch.rand(k)
        packs[j, H + k:] = torch.tensor(chosen[j], dtype=torch.float32)
    ready[:, 0] = 1
    plan.run(1, 5.0)
    assert done[:, 0].tolist() == [1] * n and got.tolist() == chosen
    assert (t_ready[1:] >= t_ready[:-1]).all()
    for j in range(n):
        want = torch.zeros(1, H)
        K.moe(packs[j, :H].view(1, H).clone(), [recs[j][e] for e in chosen[j]], packs[j, H:H + k].tolist(), spec, want)
        assert torch.equal(outs[j], want[0]), j
    packs[1, H + k + 1] = float(E)  # an expert id out of range at layer 1
    ready[:, 0] = 2
    with pytest.raises(ValueError, match="CPU layer 1"):
        plan.run(2, 5.0)
    assert done[:, 0].tolist() == [2] * n
    packs[1, H + k + 1] = 0.0
    ready[:2, 0] = 3  # layer 2's row never comes
    with pytest.raises(TimeoutError, match="CPU layer 2"):
        plan.run(3, 0.05)
    assert done[:, 0].tolist() == [3] * n
    with pytest.raises(ValueError, match="packs"):
        K.HybridPlan(ready, done, packs[:, :H], outs, recs, spec, t_ready, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch (none on this machine)")
def test_n_cpu_moe_fused_token_on_the_gpu(oracles, family, monkeypatch):
    """runtime/hybrid_token.py on a GPU: every layer's experts on the CPU (the cost model's share,
    pinned there), the token as one graph with a hand-off kernel per CPU layer and one host call;
    its logits equal the segmented path's (FLASHMOE_FUSED_TOKEN=0; same kernels on the same rows)
    and are within test_n_cpu_moe_on_the_gpu's tolerance of the all-resident run."""
    monkeypatch.delenv("FLASHMOE_SLICE_EXPERTS", raising=False)
    store = oracles(family).store("q4")
    g = torch.Generator().manual_seed(8)
    ids, steps = torch.randint(3, 384, (20,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    full = Engine(store, device="cuda", dtype=torch.float32, ram_budget=0, prefetch="off")
    ref = run_sequence(full, ids, steps)
    n = len(full.store.layers)
    full.close()
    outs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("FLASHMOE_FUSED_TOKEN", fused)
        eng = Engine(store, device="cuda", dtype=torch.float32, ram_budget=0, prefetch="off", n_cpu_moe=n)
        if eng.fast is None or not eng.fast.captured:
            eng.close()
            pytest.skip(f"no captured device step for {family}")
        cl = eng.cpu_layers
        cl.tuners, cl.copy_s, cl._adapt = None, 1e9, False  # every expert on the CPU, every token
        outs[fused] = run_sequence(eng, ids, steps)
        fast = eng.fast
        eng.close()
        if fused == "1":
            assert fast.fused is not None, fast.fused_why
            assert fast.fused.tokens == len(steps) and fast.fallbacks == 0, (fast.fused.tokens, fast.fallbacks)
        else:
            assert fast.fused is None and fast.fused_why == "FLASHMOE_FUSED_TOKEN=0"
    assert (outs["1"] - outs["0"]).abs().max() < 1e-4, (family, (outs["1"] - outs["0"]).abs().max())
    assert (outs["1"] - ref).abs().max() < 2e-2, family


def test_fused_token_failure_falls_back_to_the_segments(oracles, monkeypatch):
    # a fused token that fails after it ran (a timeout, say) is run again segmented, and so is
    # every later token: the logits stay the segmented path's, fused_why says what happened
    from flashmoe_plugin.runtime import hybrid_token
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(9)
    ids, steps = torch.randint(3, 384, (8,), generator=g).tolist(), torch.randint(3, 384, (4,), generator=g).tolist()
    _, size, total, k = reference(store, ids, steps)
    seg, _, _ = _fused_run(store, 2, ids, steps, total, size, False, monkeypatch)
    real = hybrid_token.FusedToken.run

    def flaky(self):
        real(self)
        if self.tokens == 2:
            raise TimeoutError("a stand-in timeout")
    monkeypatch.setattr(hybrid_token.FusedToken, "run", flaky)
    out, fast, _ = _fused_run(store, 2, ids, steps, total, size, True, monkeypatch)
    assert fast.fused is None and "stand-in timeout" in fast.fused_why
    assert torch.equal(out, seg), (out - seg).abs().max()
