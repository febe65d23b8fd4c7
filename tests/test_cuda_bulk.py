"""The one-token MoE's weight stream in Hopper bulk copies (the kernels' `bulk` knob, sm_90+: stages of
128 chunks, 2 per warp) feeds each lane the same chunks in the same order as the cp.async ring, so its
outputs are bit-identical to the ring's: every format on shapes whose rows are whole multiples of 32
chunks (the bulk form's condition: q8 rows of 512k values, q4 of 1024k, q2 of 2048k), stages that end
inside an expert's w2 rows and go on in the next's, partial last stages, fp32 and bf16 x, cooperative
and two launches, the ring at depths 3/4/6, records as host or device addresses, many launches in a
row; on a shape that is not whole the knob falls back to the ring. All also against the float64
reference.
Skips without a GPU, as tests/test_cuda_kernels.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.kernels.cuda_backend import CudaBackend
from flashmoe_plugin.store.layout import RecordLayout

from test_cuda_kernels import FORMATS, TOL, K, needs_gpu, rand_record, ref_expert, rel_err, stream

WHOLE = {"q8": 512, "q4": 1024, "q2": 2048}  # values per 32 chunks: a bulk stage


def _knobs(**kv):
    old = {k: K().tune(k) for k in kv}
    for k, v in kv.items():
        K().tune(k, v)
    return old


def _bulk_and_ring(run, depth):
    """run() under bulk=2 (wherever it fits) and bulk=0 (the ring at depth `depth`); both outputs, and
    whether the bulk run took the bulk stream (its launches report 2 stages, the ring 3, 4 or 6)."""
    old = _knobs(stages=depth, bulk=2)
    try:
        a = run()
        torch.cuda.synchronize()
        took = K().tune("last_stages") == 2
        K().tune("bulk", 0)
        b = run()
        torch.cuda.synchronize()
    finally:
        _knobs(**old)
    return a, b, took


@pytest.mark.cuda
@needs_gpu
def test_bulk_knob_round_trips():
    old = K().tune("bulk", 2)
    try:
        assert K().tune("bulk") == 2
        K().tune("bulk", 0)
        assert K().tune("bulk") == 0
    finally:
        K().tune("bulk", old)
    assert old == 1, "auto (1) is the default"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.cuda
@needs_gpu
def test_bulk_is_bit_identical_to_the_ring(fmt):
    gen = torch.Generator().manual_seed(31)
    wv = WHOLE[fmt]
    # (H, I, k): whole in both phases (3 experts: w2 stages cross experts; 4 * wv: 4 stages per row),
    # one expert, and I not whole (the ring).
    for (H, I, k) in ((wv, 2 * wv, 3), (4 * wv, wv, 1), (wv, wv + 64, 2)):
        layout = RecordLayout.build(fmt, H, I)
        recs = [rand_record(layout, gen) for _ in range(k)]
        drecs = [r.cuda() for r in recs]
        addrs = torch.tensor([r.data_ptr() for r in drecs], dtype=torch.int64, device="cuda")
        lt = CudaBackend.layout_tuple(layout)
        w = torch.rand(k, generator=gen) + 0.1
        ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
        x = torch.randn(1, H, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype).cuda()
            ref = sum(float(w[e]) * ref_expert(x.to(dtype).float(), recs[e], layout) for e in range(k))
            for mode in ("coop", "two"):
                for depth in (3, 4, 6):
                    for on_dev in (False, True):
                        def run():
                            out = torch.full((1, H), float("nan"), device="cuda")
                            K().moe(addrs if on_dev else drecs, lt, w.cuda(), xd, out, ws, stream(), mode=mode)
                            return out

                        a, b, took = _bulk_and_ring(run, depth)
                        where = f"{fmt} H={H} I={I} k={k} {dtype} {mode} depth {depth} dev={on_dev}"
                        assert took == (I % wv == 0), where + ": bulk taken where it should not / not taken"
                        assert torch.equal(a, b), where
                assert rel_err(a, ref) <= TOL[dtype], f"{fmt} H={H} I={I} k={k} {dtype} {mode}"


@pytest.mark.cuda
@needs_gpu
def test_bulk_over_many_launches():
    """The stages' mbarriers start over in every launch: 100 cooperative launches in a row, bulk on, give
    the ring's results for the same inputs."""
    gen = torch.Generator().manual_seed(32)
    layout = RecordLayout.build("q4", 1024, 2048)
    recs = [rand_record(layout, gen) for _ in range(2)]
    drecs = [r.cuda() for r in recs]
    lt = CudaBackend.layout_tuple(layout)
    w = torch.tensor([0.6, 0.4], device="cuda")
    ws = torch.zeros(K().workspace_bytes(2, 2048), dtype=torch.uint8, device="cuda")
    xs = [torch.randn(1, 1024, generator=gen).bfloat16().cuda() for _ in range(5)]

    def run_all():
        outs = torch.full((100, 1024), float("nan"), device="cuda")
        for i in range(100):
            K().moe(drecs, lt, w, xs[i % 5], outs[i:i + 1], ws, stream(), mode="coop")
        return outs

    a, b, took = _bulk_and_ring(run_all, 0)
    assert took
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.cuda
@needs_gpu
def test_bulk_is_the_default_where_rows_are_long():
    """The default (bulk=1) takes the bulk stream on long rows at one block per SM (q4 4096 x 4096, 2
    experts: e12's 4-stage rule gives the ring one block per SM) and gives the ring's bits there; with
    rows of 1024 (the Qwen3.5 shape's w2) it keeps the ring."""
    gen = torch.Generator().manual_seed(33)
    assert K().tune("bulk") == 1
    for (H, I, want) in ((4096, 4096, True), (4096, 1024, False)):
        layout = RecordLayout.build("q4", H, I)
        k = 2 if want else 8
        drecs = [rand_record(layout, gen).cuda() for _ in range(k)]
        lt = CudaBackend.layout_tuple(layout)
        w = (torch.rand(k, generator=gen) + 0.1).cuda()
        ws = torch.zeros(K().workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
        x = torch.randn(1, H, generator=gen).bfloat16().cuda()
        outs = []
        for bulk in (1, 0):
            old = K().tune("bulk", bulk)
            try:
                out = torch.full((1, H), float("nan"), device="cuda")
                K().moe(drecs, lt, w, x, out, ws, stream(), mode="coop")
                torch.cuda.synchronize()
                outs.append((out, K().tune("last_stages")))
            finally:
                K().tune("bulk", old)
        assert (outs[0][1] == 2) == want, f"H={H} I={I} k={k}: stages {outs[0][1]}"
        assert outs[1][1] != 2
        assert torch.equal(outs[0][0], outs[1][0]), f"H={H} I={I} k={k}"
        assert torch.isfinite(outs[0][0]).all()
