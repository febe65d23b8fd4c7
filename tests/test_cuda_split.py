"""Split-K inside a block (the kernels' FMC_TUNE_SPLIT knob): every setting gives the float64
reference's result within the kernels' tolerance, on the real Mixtral/Qwen3.5 grid sizes and on
small odd ones, and a setting gives bit-identical results call after call (graph decode relies on
it). Skips without a GPU, as tests/test_cuda_kernels.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout

from test_cuda_kernels import K, REASON, needs_gpu, rand_part, rand_record, ref_expert, rel_err, stream

SPLITS = (0, 1, 2, 4, 16)


@pytest.fixture
def split_knob():
    if REASON is not None:
        pytest.skip(REASON)
    old = K().tune("split")
    yield lambda v: K().tune("split", v)
    K().tune("split", old)


@pytest.mark.cuda
@needs_gpu
def test_knob_round_trips(split_knob):
    split_knob(4)
    assert K().tune("split") == 4
    split_knob(0)
    assert K().tune("split") == 0


@pytest.mark.cuda
@needs_gpu
def test_linear_every_split(split_knob):
    gen = torch.Generator().manual_seed(11)
    for (n, k) in ((14336, 4096), (4096, 14336), (37, 192), (130, 320), (257, 1024)):
        part = rand_part("q4", (n, k), gen).cuda()
        w = torch.empty(n, k, device="cuda")
        K().dequant(part, "q4", n, k, w)
        for T in (1, 3):
            x = torch.randn(T, k, generator=gen).bfloat16().cuda()
            ref = x.double() @ w.double().T
            for s in SPLITS:
                split_knob(s)
                outs = []
                for _ in range(2):
                    out = torch.full((T, n), float("nan"), device="cuda")
                    K().linear(part, "q4", n, k, x, out, stream())
                    outs.append(out)
                err = rel_err(outs[0], ref)
                assert err <= 1e-3, f"N={n} K={k} T={T} split={s}: rel err {err:.3g}"
                assert torch.equal(outs[0], outs[1]), f"N={n} K={k} T={T} split={s}: not deterministic"


@pytest.mark.parametrize("H,I,k", [(4096, 1024, 4), (4096, 14336, 2), (192, 320, 5)])
@pytest.mark.cuda
@needs_gpu
def test_moe_every_split(split_knob, H, I, k):
    gen = torch.Generator().manual_seed(12)
    layout = RecordLayout.build("q4", H, I)
    recs = [rand_record(layout, gen) for _ in range(k)]
    drecs = [r.cuda() for r in recs]
    w = torch.softmax(torch.randn(k, generator=gen), 0)
    lt = CudaBackend.layout_tuple(layout)
    ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
    for T in (1, 2):
        x = torch.randn(T, H, generator=gen)
        ref = sum(float(w[e]) * ref_expert(x, recs[e], layout) for e in range(k))
        for s in SPLITS:
            split_knob(s)
            for mode in ("coop", "two"):
                outs = []
                for _ in range(2):
                    out = torch.full((T, H), float("nan"), device="cuda")
                    K().moe(drecs, lt, w.cuda(), x.cuda(), out, ws, stream(), mode=mode)
                    outs.append(out)
                err = rel_err(outs[0], ref)
                assert err <= 1e-5, f"H={H} I={I} k={k} T={T} split={s} {mode}: rel err {err:.3g}"
                assert torch.equal(outs[0], outs[1]), f"H={H} I={I} k={k} split={s} {mode}: not deterministic"


@pytest.mark.cuda
@needs_gpu
def test_dependent_launches_with_and_without_pdl(split_knob):
    """A chain where each launch reads the previous one's output (linear -> two-launch MoE ->
    linear, the MoE's records as device addresses), eagerly and replayed from a CUDA graph:
    with programmatic dependent launch the results are bit-identical to without it."""
    gen = torch.Generator().manual_seed(13)
    H, I, k = 1024, 2048, 3
    layout = RecordLayout.build("q4", H, I)
    recs = [rand_record(layout, gen).cuda() for _ in range(k)]
    addrs = torch.tensor([r.data_ptr() for r in recs], dtype=torch.int64, device="cuda")
    w = torch.softmax(torch.randn(k, generator=gen), 0).cuda()
    lt = CudaBackend.layout_tuple(layout)
    ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
    p1, p2 = rand_part("q4", (H, H), gen).cuda(), rand_part("q4", (H, H), gen).cuda()
    x = torch.randn(1, H, generator=gen).bfloat16().cuda()
    a, b, c = (torch.empty(1, H, dtype=torch.bfloat16, device="cuda") for _ in range(3))

    def chain():
        K().linear(p1, "q4", H, H, x, a, stream())
        K().moe(addrs, lt, w, a, b, ws, stream(), mode="two")
        K().linear(p2, "q4", H, H, b, c, stream())

    results = {}
    for pdl in (0, 1):
        old = K().tune("pdl", pdl)
        try:
            chain()
            eager = c.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain()
            c.zero_()
            g.replay()
            torch.cuda.synchronize()
            results[pdl] = (eager, c.clone())
        finally:
            K().tune("pdl", old)
    assert torch.equal(results[0][0], results[0][1])
    assert torch.equal(results[1][0], results[0][0]), "PDL changed an eager result"
    assert torch.equal(results[1][1], results[0][0]), "PDL changed a graph-replayed result"
