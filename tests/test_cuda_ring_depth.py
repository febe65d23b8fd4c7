"""The weight ring's depth (the kernels' FMC_TUNE_STAGES knob: 3, 4 or 6 stages per warp, or auto)
changes how far ahead each warp's copies run, never what is computed: every depth gives results
bit-identical to every other, for the GEMV and the fused MoE (cooperative and two launches), on
shapes whose rows end in a partial stage (chunks per row not a multiple of 32) and whose
experts' w2 rows make several segments; and they match the float64 reference. Skips without a
GPU, as tests/test_cuda_kernels.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin import quant
from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout

from test_cuda_kernels import FORMATS, TOL, K, needs_gpu, rand_part, rand_record, ref_expert, rel_err, stream

DEPTHS = (3, 4, 6, 0)


def _at_each_depth(fn):
    old = K().tune("stages")
    outs = {}
    try:
        for d in DEPTHS:
            K().tune("stages", d)
            outs[d] = fn()
            torch.cuda.synchronize()
            outs[d] = (outs[d], K().tune("last_stages"))
    finally:
        K().tune("stages", old)
    return outs


@pytest.mark.cuda
@needs_gpu
def test_knob_round_trips_and_auto_is_the_default():
    old = K().tune("stages", 4)
    try:
        assert K().tune("stages") == 4
    finally:
        K().tune("stages", old)
    assert old == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_linear_is_the_same_at_every_depth(fmt):
    gen = torch.Generator().manual_seed(21)
    for (n, k) in ((130, 4160), (2050, 1024), (37, 192)):
        part = rand_part(fmt, (n, k), gen)
        w = quant.dequantize(part, fmt, (n, k)).double()
        dpart = part.cuda()
        for T in (1, 3):
            x = torch.randn(T, k, generator=gen).bfloat16()
            xd = x.cuda()

            def run():
                out = torch.full((T, n), float("nan"), device="cuda")
                K().linear(dpart, fmt, n, k, xd, out, stream())
                return out

            outs = _at_each_depth(run)
            assert {outs[d][1] for d in (3, 4, 6)} == {3, 4, 6}, "the knob did not set the depth"
            for d in DEPTHS:
                assert torch.equal(outs[d][0], outs[3][0]), f"{fmt} ({n}, {k}) T={T} depth {d}"
            assert rel_err(outs[3][0], x.double() @ w.T) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_moe_is_the_same_at_every_depth(fmt):
    gen = torch.Generator().manual_seed(22)
    for (H, I, k) in ((256, 320, 3), (1024, 1024, 4)):
        layout = RecordLayout.build(fmt, H, I)
        recs = [rand_record(layout, gen) for _ in range(k)]
        drecs = [r.cuda() for r in recs]
        lt = CudaBackend.layout_tuple(layout)
        w = torch.rand(k, generator=gen) + 0.1
        ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
        for T in (1, 2):
            x = torch.randn(T, H, generator=gen)
            ref = sum(float(w[e]) * ref_expert(x, recs[e], layout) for e in range(k))
            for mode in ("coop", "two"):
                def run():
                    out = torch.full((T, H), float("nan"), device="cuda")
                    K().moe(drecs, lt, w.cuda(), x.cuda(), out, ws, stream(), mode=mode)
                    return out

                outs = _at_each_depth(run)
                for d in DEPTHS:
                    assert torch.equal(outs[d][0], outs[3][0]), f"{fmt} H={H} I={I} T={T} {mode} depth {d}"
                assert rel_err(outs[3][0], ref) <= TOL[torch.float32], f"{fmt} H={H} I={I} T={T} {mode}"
