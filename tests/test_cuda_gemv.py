"""The decode GEMV (csrc/cuda/fm_gemv.cu, _kernels_cuda.gemv) and its dispatch (CudaBackend.linear /
linear_stack, PackedStack): q8/q4 parts, 1..4 tokens of bf16/f16 x, one part or several stacked
along the rows in one launch.

Oracles: quant.dequantize + float64 torch math (the tolerances of tests/test_cuda_kernels.py:
8e-3 relative with a 16-bit output, 1e-3 with fp32 output, where only x's 16-bit fixed point
remains), fmc_linear (`linear`, the same arithmetic in another summation order) and, for stacked
parts, each part alone (bit-identical at the same split). Skipped without a GPU or the compiled
module; the CPU twin of the stacked product is tests/test_packed_stack.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin import quant

from test_cuda_kernels import REASON, rand_part, rel_err  # noqa: I001

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
TOL16 = 8e-3
SHAPES = [(1, 64), (3, 64), (37, 192), (130, 320), (257, 1024), (64, 4160)]
DECODE_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def K():
    import flashmoe_plugin._kernels_cuda as k
    return k


@pytest.fixture(autouse=True)
def _auto_knobs():
    yield
    for key in ("split", "warps", "kernel", "grid", "persist"):
        K().gemv_tune(key, 0)


def _case(fmt, shape, gen):
    part = rand_part(fmt, shape, gen)
    return part.cuda(), quant.dequantize(part, fmt, shape).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_gemv_equals_the_reference(fmt, dtype):
    gen = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        part, w = _case(fmt, shape, gen)
        for T in (1, 2, 3, 4):
            x = torch.randn(T, shape[1], generator=gen).to(dtype)
            ref = x.double() @ w.T
            y = torch.full((T, shape[0]), float("nan"), dtype=dtype, device="cuda")
            K().gemv([part], fmt, [shape[0]], shape[1], x.cuda(), y)
            assert rel_err(y, ref) <= TOL16, f"{fmt} {dtype} {shape} T={T}"
            y32 = torch.full((T, shape[0]), float("nan"), device="cuda")
            K().gemv([part], fmt, [shape[0]], shape[1], x.cuda(), y32)
            assert rel_err(y32, ref) <= 1e-3, f"{fmt} {dtype} {shape} T={T} fp32 out"


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_gemv_at_decode_shapes_against_the_reference_and_linear(fmt):
    """The dense shapes of a decode token (Mixtral's o and k/v, dense MLPs), every split: within the
    fp32-output tolerance of the reference and of fmc_linear."""
    gen = torch.Generator().manual_seed(4)
    for shape in DECODE_SHAPES:
        part, w = _case(fmt, shape, gen)
        for T in (1, 4):
            x = torch.randn(T, shape[1], generator=gen).bfloat16()
            ref = x.double() @ w.T
            old = torch.empty(T, shape[0], device="cuda")
            K().linear(part, fmt, shape[0], shape[1], x.cuda(), old)
            for split in (0, 1, 2, 4, 8):
                K().gemv_tune("split", split)
                y = torch.full((T, shape[0]), float("nan"), device="cuda")
                K().gemv([part], fmt, [shape[0]], shape[1], x.cuda(), y)
                assert rel_err(y, ref) <= 1e-3, f"{fmt} {shape} T={T} split {split}"
                assert rel_err(y, old.double()) <= 1e-4, f"{fmt} {shape} T={T} split {split} vs linear"


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_stacked_parts_in_one_launch_equal_each_part(fmt):
    """q, k, v (and odd row counts: pairs never straddle parts) in one launch: bit-identical to
    each part alone at the same split and block size, within tolerance of the reference."""
    gen = torch.Generator().manual_seed(5)
    for rows, cols in (((4096, 1024, 1024), 4096), ((37, 1, 130, 64), 320)):
        cases = [_case(fmt, (r, cols), gen) for r in rows]
        for T in (1, 3):
            x = torch.randn(T, cols, generator=gen).bfloat16().cuda()
            for split, warps in ((1, 8), (2, 8), (4, 4)):
                K().gemv_tune("split", split)
                K().gemv_tune("warps", warps)
                y = torch.full((T, sum(rows)), float("nan"), dtype=torch.bfloat16, device="cuda")
                K().gemv([p for p, _ in cases], fmt, list(rows), cols, x, y)
                alone = [K().gemv([p], fmt, [r], cols, x, torch.empty(T, r, dtype=torch.bfloat16, device="cuda"))
                         for (p, _), r in zip(cases, rows)]
                assert torch.equal(y, torch.cat(alone, dim=-1)), f"{fmt} {rows} T={T} split {split}"
                ref = x.double().cpu() @ torch.cat([w for _, w in cases]).T
                assert rel_err(y, ref) <= TOL16


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_the_persistent_grid_equals_a_block_per_item(fmt):
    """gemv_persist (auto's kernel past one wave: a grid of at most the resident blocks, each
    looping over items with the next batch's loads in flight), both variants (registers for 2 or
    3 blocks per SM), at grid caps that leave 1, several or all items to a block: bit-identical to
    gemv_kernel (a block per item) at the same split and block size, stacked parts with odd row
    counts, slices ending inside a batch."""
    gen = torch.Generator().manual_seed(10)
    for rows, cols in (((4096, 1024, 1024), 4096), ((37, 1, 130, 64), 320), ((300,), 4160)):
        cases = [_case(fmt, (r, cols), gen) for r in rows]
        parts, n = [p for p, _ in cases], sum(rows)
        for T in (1, 2, 4):
            x = torch.randn(T, cols, generator=gen).bfloat16().cuda()
            for split, warps in ((1, 8), (2, 8), (4, 4), (8, 8)):
                K().gemv_tune("split", split)
                K().gemv_tune("warps", warps)
                K().gemv_tune("kernel", 1)
                want = K().gemv(parts, fmt, list(rows), cols, x, torch.full((T, n), float("nan"), device="cuda"))
                assert K().gemv_tune("last_kernel") == 1
                for kernel in (2, 3):
                    K().gemv_tune("kernel", kernel)
                    for grid in (1, 3, 0):
                        K().gemv_tune("grid", grid)
                        y = K().gemv(parts, fmt, list(rows), cols, x, torch.full((T, n), float("nan"), device="cuda"))
                        assert K().gemv_tune("last_kernel") == kernel
                        assert grid == 0 or K().gemv_tune("last_grid") <= grid
                        assert torch.equal(y, want), f"{fmt} {rows} T={T} split {split} kernel {kernel} grid {grid}"
            ref = x.double().cpu() @ torch.cat([w for _, w in cases]).T
            assert rel_err(y, ref) <= 1e-3


def test_auto_takes_a_block_per_item_in_one_wave_and_the_persistent_grid_past_it():
    """kernel 0 (auto): gemv_kernel where its blocks fit on the device at once, else the persistent
    grid in the variant the `persist` knob names (by default 3 for q4 at one token, else 2), capped
    at the resident blocks.
    At one q4 token gemv_kernel holds 2 blocks of 8 warps per SM (its registers): on the H200's 132
    SMs o 4096x4096 (256 blocks) is one wave, q/k/v stacked (384 blocks) is not."""
    gen = torch.Generator().manual_seed(11)
    waves = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(1, 4096, generator=gen).bfloat16().cuda()
    o = _case("q4", (4096, 4096), gen)[0]
    K().gemv([o], "q4", [4096], 4096, x, torch.empty(1, 4096, device="cuda"))
    if 256 <= waves:
        assert (K().gemv_tune("last_kernel"), K().gemv_tune("last_grid")) == (1, 256)
    parts = [_case("q4", (r, 4096), gen)[0] for r in (4096, 1024, 1024)]
    for persist, want in ((0, 3), (2, 2), (3, 3)):
        K().gemv_tune("persist", persist)
        K().gemv(parts, "q4", [4096, 1024, 1024], 4096, x, torch.empty(1, 6144, device="cuda"))
        if 384 > waves:
            assert K().gemv_tune("last_kernel") == want and K().gemv_tune("last_grid") <= 384
    K().gemv_tune("persist", 0)
    x4 = torch.randn(4, 4096, generator=gen).bfloat16().cuda()
    K().gemv(parts, "q4", [4096, 1024, 1024], 4096, x4, torch.empty(4, 6144, device="cuda"))
    assert K().gemv_tune("last_kernel") == 2  # 2..4 tokens: 2 blocks per SM (no spills)


def test_gemv_replays_in_a_cuda_graph_as_it_runs_eagerly():
    gen = torch.Generator().manual_seed(6)
    parts = [_case("q4", (r, 1024), gen)[0] for r in (512, 128, 128)]
    x = torch.randn(1, 1024, generator=gen).bfloat16().cuda()
    eager = K().gemv(parts, "q4", [512, 128, 128], 1024, x, torch.empty(1, 768, dtype=torch.bfloat16, device="cuda"))
    y = torch.zeros(1, 768, dtype=torch.bfloat16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        K().gemv(parts, "q4", [512, 128, 128], 1024, x, y, s.cuda_stream)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def test_gemv_nan_in_x_reaches_the_output():
    gen = torch.Generator().manual_seed(7)
    part, _ = _case("q8", (64, 256), gen)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    x[0, 70] = float("inf")
    y = K().gemv([part], "q8", [64], 256, x.cuda(), torch.empty(1, 64, device="cuda"))
    assert torch.isnan(y).all()


def test_gemv_refuses_what_it_does_not_take():
    gen = torch.Generator().manual_seed(8)
    part, _ = _case("q4", (8, 128), gen)
    x = torch.randn(1, 128, device="cuda").bfloat16()
    y = torch.empty(1, 8, device="cuda")
    with pytest.raises(ValueError, match="q8 and q4"):
        K().gemv([part], "q2", [8], 128, x, y)
    with pytest.raises(ValueError, match="tokens"):
        K().gemv([part], "q4", [8], 128, x.float(), y)
    with pytest.raises(ValueError, match="tokens"):
        K().gemv([part], "q4", [8], 128, x.expand(5, 128).contiguous(), torch.empty(5, 8, device="cuda"))
    with pytest.raises(ValueError, match="parts"):
        K().gemv([part] * 5, "q4", [8] * 5, 128, x, torch.empty(1, 40, device="cuda"))
    with pytest.raises(ValueError, match="holds"):
        K().gemv([part[:100]], "q4", [8], 128, x, y)
    with pytest.raises(ValueError, match="out"):
        K().gemv([part, part], "q4", [8, 8], 128, x, y)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_backend_and_packed_stack_run_the_gemv(fmt, monkeypatch):
    """PackedStack (q, k, v) at 1..4 bf16 tokens runs the GEMV in one launch, bit-identical to the
    kernel's own call; one part (CudaBackend.linear) only at one token and up to gemv_max_elems;
    5+ tokens, fp32 x, and the switch CudaBackend.gemv off (FLASHMOE_GEMV=0) take fmc_linear per
    part + cat, bit for bit."""
    from flashmoe_plugin import kernels
    from flashmoe_plugin.kernels.packed import PackedStack, PackedWeight
    be = kernels.select("cuda")
    gen = torch.Generator().manual_seed(9)
    cols, rows = 512, [256, 64, 64]
    cases = [_case(fmt, (r, cols), gen) for r in rows]
    parts = [p for p, _ in cases]
    ws = [PackedWeight(p, fmt, (r, cols), be, torch.bfloat16) for p, r in zip(parts, rows)]
    stack = PackedStack(ws)
    assert stack.uniform
    ref_w = torch.cat([w for _, w in cases])

    def old(x):
        return torch.cat([K().linear(p, fmt, r, cols, x, torch.empty(x.shape[0], r, dtype=x.dtype, device="cuda"))
                          for p, r in zip(parts, rows)], dim=-1)
    for T, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (5, torch.bfloat16), (2, torch.float32)):
        x = torch.randn(T, cols, generator=gen).to(dtype).cuda()
        y = stack.linear(x)
        assert y.shape == (T, sum(rows)) and y.dtype == dtype
        assert rel_err(y, x.double().cpu() @ ref_w.T) <= TOL16
        if T <= 4 and dtype != torch.float32:
            assert torch.equal(y, K().gemv(parts, fmt, rows, cols, x, torch.empty_like(y)))
            one = torch.empty(T, rows[0], dtype=dtype, device="cuda")
            want = K().gemv(parts[:1], fmt, rows[:1], cols, x, one) if T == 1 else \
                K().linear(parts[0], fmt, rows[0], cols, x, one)  # one part: the GEMV at one token only
            assert torch.equal(ws[0].linear(x), want)
            monkeypatch.setattr(type(be), "gemv_max_elems", 1000)  # larger parts: fmc_linear
            assert torch.equal(ws[0].linear(x), K().linear(parts[0], fmt, rows[0], cols, x, torch.empty_like(one)))
            monkeypatch.undo()
            monkeypatch.setattr(type(be), "gemv", False)
            assert torch.equal(stack.linear(x), old(x))
            monkeypatch.setattr(type(be), "gemv", True)
        else:
            assert torch.equal(y, old(x))
