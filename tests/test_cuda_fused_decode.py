"""The fused decode kernels (csrc/cuda/fm_decode.cu) against their torch references
(runtime/fused_decode.py's *_ref, which tests/test_fused_decode.py checks on CPU), and the fused
device step against decode_ops' step on the GPU. The fused step is off by default (FLASHMOE_DECODE_FUSED=1 turns it on): the last test runs
tests/test_cuda_graph_decode.py's graph-vs-eager check with it in every family.
Skipped without a CUDA GPU (CI has none)."""
import math

import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.runtime import fused_decode as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU visible to torch (none on this machine)")
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _kernels():
    from flashmoe_plugin.kernels import decode_cuda
    ok, why = decode_cuda.available()
    if not ok:
        pytest.skip(why)
    return decode_cuda


def _close(a, b, dt, what):
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
    assert err < TOL[dt], f"{what}: relative error {err}"


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_add_norm(dt):
    k = _kernels()
    g = torch.Generator("cuda").manual_seed(1)
    for n in (64, 4096, 5120):
        h, d, w = (torch.randn(1, n, generator=g, device="cuda").to(dt) for _ in range(3))
        out, ref_out = torch.empty_like(h), torch.empty_like(h)
        x = k.add_norm(h, d, out, w, 1e-5)
        ref = F.add_norm_ref(h, d, ref_out, w, 1e-5)
        assert torch.equal(out, ref_out)
        _close(x, ref, dt, f"add_norm n={n}")


# heads, kv_heads, head_dim, qk_norm, clip, window: the test families' shapes and Mixtral's
SHAPES = [(4, 2, 16, "none", None, 0), (4, 2, 32, "head", None, 0), (4, 4, 16, "full", None, 0),
          (8, 2, 64, "none", 0.5, 0), (6, 2, 16, "none", None, 5), (32, 8, 128, "none", None, 0)]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_attention(dt, shape):
    k = _kernels()
    heads, kvh, hd, qk_norm, clip, window = shape
    n_ctx, dev = 300, torch.device("cuda")
    g = torch.Generator("cuda").manual_seed(heads * 1000 + kvh * 100 + hd)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    nq, nk = heads * hd, kvh * hd
    qn = {"none": None, "head": hd, "full": nq}[qk_norm]
    kn = {"none": None, "head": hd, "full": nk}[qk_norm]
    q_norm = None if qn is None else (1 + 0.1 * torch.randn(qn, generator=g, device=dev)).to(dt)
    k_norm = None if kn is None else (1 + 0.1 * torch.randn(kn, generator=g, device=dev)).to(dt)
    kpos = torch.arange(n_ctx, device=dev)
    for p in (0, 1, 77, n_ctx - 1):
        qkv = torch.randn(1, nq + 2 * nk, generator=g, device=dev).to(dt)
        K = torch.randn(n_ctx, kvh, hd, generator=g, device=dev).to(dt)
        V = torch.randn(n_ctx, kvh, hd, generator=g, device=dev).to(dt)
        pos = torch.tensor([p], device=dev)
        freqs = pos.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dt)[:, None, :], emb.sin().to(dt)[:, None, :]
        Kr, Vr = K.clone(), V.clone()
        ref = F.attend_ref(qkv, q_norm, k_norm, qk_norm, clip, cos, sin, Kr, Vr, pos, kpos, heads, kvh, hd, window,
                           1e-6, 1 / math.sqrt(hd))
        outs = []
        for splits in (1, 3, 16):
            att = k.Attention(kvh, heads, hd, n_ctx, dev, splits=splits)
            Kc, Vc = K.clone(), V.clone()
            out = att.run(qkv, q_norm, k_norm, qk_norm, clip, inv_freq, pos, Kc, Vc, heads, kvh, hd, window, 1e-6,
                          1 / math.sqrt(hd))
            again = att.run(qkv, q_norm, k_norm, qk_norm, clip, inv_freq, pos, Kc, Vc, heads, kvh, hd, window, 1e-6,
                            1 / math.sqrt(hd))
            assert torch.equal(out, again), "not deterministic (or the counters were left non-zero)"
            assert torch.equal(att.counters, torch.zeros_like(att.counters))
            rest = torch.ones(n_ctx, dtype=torch.bool, device=dev)
            rest[p] = False
            assert torch.equal(Kc[rest], K[rest]) and torch.equal(Vc[rest], V[rest]), "wrote outside pos"
            assert torch.equal(Vc[p], Vr[p])
            _close(Kc[p], Kr[p], dt, f"K at {p}")
            _close(out, ref, dt, f"attention at {p}, splits {splits}")
            outs.append(out)
        _close(outs[0], outs[2], dt, "splits 1 vs 16")


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,top_k,norm", [(8, 2, True), (60, 4, False), (128, 8, True)])
def test_route(dt, experts, top_k, norm):
    k = _kernels()
    dev, n = torch.device("cuda"), 2048
    g = torch.Generator("cuda").manual_seed(experts)
    router = k.Router(experts, dev)
    entries = torch.randperm(experts, generator=g, device=dev)
    base = torch.tensor([1 << 40], device=dev)
    for _ in range(3):
        h, o, w = (torch.randn(1, n, generator=g, device=dev).to(dt) for _ in range(3))
        rw = (torch.randn(experts, n, generator=g, device=dev) / 8).to(dt)
        ids_row, ref_ids_row = torch.zeros(top_k, dtype=torch.long, device=dev), torch.zeros(top_k, dtype=torch.long,
                                                                                              device=dev)
        h2, ref_h2 = torch.empty_like(h), torch.empty_like(h)
        x, ids, wts, addrs = router.run(h, o, h2, w, rw, ids_row, entries, base, 4096, top_k, norm, 1e-6)
        rx, rids, rwts, raddrs = F.route_ref(h, o, ref_h2, w, rw, ref_ids_row, entries, base, 4096, top_k, norm, 1e-6)
        assert torch.equal(h2, ref_h2)
        _close(x, rx, dt, "x")
        assert torch.equal(ids_row, ids)
        # the same experts; the order may differ only between equal probabilities (bf16 logits tie)
        assert torch.equal(ids.sort().values, rids.sort().values), (ids, rids)
        _close(wts, rwts, dt, "weights")
        assert torch.equal(wts.sort(descending=True).values, wts), "top-k not in descending order"
        assert torch.equal(addrs, base + entries[ids] * 4096)
        assert int(router.counter.item()) == 0


def test_fused_step_matches_the_decode_ops_step(oracles, monkeypatch):
    """Engine level, Mixtral test model, fp32: fused vs decode_ops' compiled step (the default),
    and the fused step captured vs eager (same kernels: torch.equal), with and without misses."""
    from flashmoe_plugin.runtime.engine import Engine
    _kernels()
    store = oracles("mixtral").store("q4")
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(3, 384, (12,), generator=g).tolist(), torch.randint(3, 384, (8,), generator=g).tolist()
    outs = {}
    for env in ("1", "0"):
        monkeypatch.setenv("FLASHMOE_DECODE_FUSED", env)
        eng = Engine(store, device="cuda", dtype=torch.float32, prefetch="off", decode_graph="on")
        try:
            assert (eng.fast.fused is not None) == (env == "1"), eng.fast.fused_note
            assert eng.fast.captured, eng.fast.why_not
            outs[env] = run_sequence(eng, ids, steps)
            if env == "1":
                assert eng.fast.fused is not None and eng.fast.fused.native, eng.fast.fused_note
        finally:
            eng.close()
    assert (outs["auto"] - outs["0"]).abs().max() < 1e-3


def test_fused_graph_equals_eager_in_every_family(oracles, family, monkeypatch):
    """tests/test_cuda_graph_decode.py's check (captured == eager with the same kernels, with and
    without misses; within the GPU tolerance of the CPU engine) with the fused kernels on."""
    import test_cuda_graph_decode
    _kernels()
    monkeypatch.setenv("FLASHMOE_DECODE_FUSED", "1")
    test_cuda_graph_decode.test_graph_decode_equals_eager_in_every_family(oracles, family)
