"""The decode layer's folds on a real GPU (kernels/decode_fuse.py): the residual add and the
attention norm inside the q/k/v GEMV (fm_gemv.cu's fmc_gemv_norm), and the routing after
attention in one block (fm_route.cu's fmc_route).

Oracles: the torch formulas they replace (models.layers.rms_norm, decode_ops.route / addresses,
the CPU twin), run on the GPU: the residual, the normed x and so the GEMV's output bit for bit
(the GEMV run on the formula's x); the routing's ids and addresses equal, its weights within a
rounding of the dtype. Then whole decode steps: graph == eager (same kernels) with the folds,
close to the same engine without them, with fewer kernels per step. Skipped without a GPU or the
compiled module (CI has neither); the formulas' own tests are tests/test_decode_ops.py."""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.models.layers import rms_norm

from test_cuda_kernels import REASON, rand_part  # noqa: I001

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def K():
    import flashmoe_plugin._kernels_cuda as k
    return k


@pytest.fixture(autouse=True)
def _auto_knobs():
    yield
    K().gemv_tune("kernel", 0)


def _acts(H, dtype, gen, scale=1.0):
    return (torch.randn(1, H, generator=gen) * scale).to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("kernel", [0, 1, 2, 3])  # auto, a block per item, the persistent grids
def test_norm_gemv_equals_the_norm_then_the_gemv(fmt, dtype, kernel):
    gen = torch.Generator().manual_seed(5)
    for rows, H in (([512, 128, 128], 256), ([4096, 1024, 1024], 4096), ([192], 1024)):
        parts = [rand_part(fmt, (r, H), gen).cuda() for r in rows]
        h, delta = _acts(H, dtype, gen, 3.0), _acts(H, dtype, gen, 0.5)
        w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype).cuda()
        K().gemv_tune("kernel", kernel)
        hs = torch.full((H,), float("nan"), dtype=dtype, device="cuda")
        y = torch.full((1, sum(rows)), float("nan"), dtype=dtype, device="cuda")
        K().gemv_norm(parts, fmt, rows, H, h.view(-1), delta.view(-1), w, 1e-5, hs, y)
        ref_h = h + delta
        x = rms_norm(ref_h, w, 1e-5)
        ref = torch.empty_like(y)
        K().gemv(parts, fmt, rows, H, x, ref)
        assert torch.equal(hs, ref_h.view(-1)), f"{fmt} {dtype} {rows}"
        assert torch.equal(y, ref), f"{fmt} {dtype} {rows} kernel {kernel}"


def _route_ref(h, o, w, router, entries, base, stride, k, norm_topk, eps):
    from flashmoe_plugin.runtime import decode_ops
    h2 = h + o
    ids_row = torch.zeros(k, dtype=torch.int64, device="cuda")
    x, ids, weights = decode_ops.route(h2, w, router, ids_row, k, norm_topk, eps)
    return h2, x, ids, weights, decode_ops.addresses(entries, ids, base, stride)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("E,k,H", [(8, 2, 4096), (60, 4, 2048), (128, 8, 4096), (16, 1, 64), (32, 4, 8192)])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_equals_the_formula(dtype, E, k, H, norm_topk):
    gen = torch.Generator().manual_seed(E * 131 + k * 7 + H)
    for _ in range(3):
        h, o = _acts(H, dtype, gen, 2.0), _acts(H, dtype, gen, 0.3)
        w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype).cuda()
        router = (torch.randn(E, H, generator=gen) * 0.05).to(dtype).cuda()
        entries = torch.randperm(E, generator=gen).cuda()
        base, stride = torch.tensor([1 << 40], dtype=torch.int64, device="cuda"), 3 * 4096
        ref = _route_ref(h, o, w, router, entries, base, stride, k, norm_topk, 1e-5)
        ids_row = torch.full((k,), -1, dtype=torch.int64, device="cuda")
        from flashmoe_plugin.kernels import decode_fuse
        assert decode_fuse.takes_route(h, w, router, k)
        h2, x, ids, weights, addrs = decode_fuse.route(h, o, w, router, ids_row, entries, base, stride, 1e-5, k,
                                                       norm_topk)
        assert torch.equal(h2, ref[0]) and torch.equal(x, ref[1])
        assert torch.equal(ids, ref[2]) and torch.equal(ids_row, ids[0]), (ids, ref[2])
        assert torch.equal(addrs, ref[4])
        torch.testing.assert_close(weights.float(), ref[3].float(), rtol=1e-2, atol=1e-3)


def test_route_breaks_ties_to_the_lower_id():
    H, E = 64, 16
    h = torch.ones(1, H, dtype=torch.bfloat16, device="cuda")
    o = torch.zeros_like(h)
    w = torch.ones(H, dtype=torch.bfloat16, device="cuda")
    router = torch.zeros(E, H, dtype=torch.bfloat16, device="cuda")
    router[[3, 9, 12]] = 0.5  # three equal logits above the rest
    from flashmoe_plugin.kernels import decode_fuse
    ids_row = torch.zeros(4, dtype=torch.int64, device="cuda")
    entries = torch.arange(E, device="cuda")
    base = torch.zeros(1, dtype=torch.int64, device="cuda")
    _, _, ids, weights, _ = decode_fuse.route(h, o, w, router, ids_row, entries, base, 1, 1e-5, 4, True)
    assert ids.tolist() == [[3, 9, 12, 0]]
    assert weights[0, 0] == weights[0, 1] == weights[0, 2]


def _steps(store, fold, mode, ids, steps, monkeypatch):
    from flashmoe_plugin.kernels import decode_fuse
    from flashmoe_plugin.runtime.engine import Engine
    from conftest import run_sequence
    monkeypatch.setattr(decode_fuse, "FOLDS", fold)
    eng = Engine(store, device="cuda", dtype=torch.bfloat16, prefetch="off", decode_graph=mode, dense_quant="q4")
    out = run_sequence(eng, ids, steps)
    kernels = eng.fast.kernels_per_step()
    assert mode != "on" or eng.fast.captured, eng.fast.why_not
    eng.close()
    return out, kernels


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe"])  # qwen2_moe: q/k/v biases, a shared expert, a dense layer
def test_graph_decode_with_the_folds_equals_eager_and_the_unfolded_step(oracles, monkeypatch, fam):
    from flashmoe_plugin.kernels import decode_fuse
    store = oracles(fam).store("q4")
    g = torch.Generator().manual_seed(23)
    ids, steps = torch.randint(3, 384, (16,), generator=g).tolist(), torch.randint(3, 384, (10,), generator=g).tolist()
    both = decode_fuse.NORM | decode_fuse.ROUTE
    on, k_on = _steps(store, both, "on", ids, steps, monkeypatch)
    eager, _ = _steps(store, both, "eager", ids, steps, monkeypatch)
    off, k_off = _steps(store, 0, "on", ids, steps, monkeypatch)
    assert torch.equal(on, eager)
    # per MoE layer the attention norm and three routing kernels fold away (the oracles: 3 layers,
    # qwen2_moe's second one dense)
    assert k_on is None or k_off is None or k_off - k_on >= 2 * (3 if fam == "mixtral" else 2), (k_off, k_on)
    assert (on.float() - off.float()).abs().max() <= 0.05 * off.float().abs().max()
