"""Programmatic dependent launch (the kernels' FMC_TUNE_PDL knob, sm_90+): a launch that may start
before its predecessor ends must still see that predecessor's output, eagerly and replayed from
a CUDA graph, and give results bit-identical to plain launches. Skips without a GPU, as
tests/test_cuda_kernels.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout

from test_cuda_kernels import K, needs_gpu, rand_part, rand_record, stream


@pytest.mark.cuda
@needs_gpu
def test_knob_round_trips():
    old = K().tune("pdl", 0)
    try:
        assert K().tune("pdl") == 0
    finally:
        K().tune("pdl", old)
    assert old == 1, "PDL is on by default"


@pytest.mark.cuda
@needs_gpu
def test_dependent_launches_with_and_without_pdl():
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
