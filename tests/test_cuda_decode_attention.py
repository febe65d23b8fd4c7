"""The decode-attention kernel (csrc/cuda/fm_attn.cu, kernels/decode_attention.py): RoPE, the K/V
writes at the position and GQA attention over 0..pos in one launch.

Oracles: its torch formula (runtime/decode_ops.attend, the CPU twin and what the graph path ran
before): the K/V caches it writes must be torch.equal (RoPE's roundings are the dtype's, as
torch's), the output within the formula's own error against a float64 attention of the same
rotated q and cache (the formula rounds the probabilities to the dtype, the kernel keeps them in
fp32). Positions 0, a middle one and n_ctx - 1, GQA ratios 1/4/8/16, head_dim 16..256,
bf16/fp16/fp32, a sliding window, and replays of a captured graph at new positions. Skipped
without a GPU or the compiled module (CI has neither)."""
from __future__ import annotations

import math

import pytest
import torch

from flashmoe_plugin.kernels import compiled
from flashmoe_plugin.runtime.decode_ops import attend, rope_tables

_km, _why = compiled("_attn_cuda")
REASON = ("needs an NVIDIA GPU visible to torch (none on this machine)" if not torch.cuda.is_available() else
          f"flashmoe_plugin._attn_cuda not built: {_why}" if _km is None else None)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _case(heads, kvh, d, n_ctx, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)  # noqa: E731
    K, V = r(n_ctx, kvh, d), r(n_ctx, kvh, d)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    return r(1, heads, d) * 2, r(1, kvh, d) * 2, r(1, kvh, d), K, V, inv_freq


def _torch(q, k, v, K, V, pos, inv_freq, window, scale):
    cos, sin = rope_tables(pos, inv_freq, q.dtype)
    kpos = torch.arange(K.shape[0], device="cuda")
    return attend(q, k, v, cos, sin, K, V, pos, kpos, window, scale)


def _exact(q, k, K, V, pos, inv_freq, window, scale):
    """float64 attention of the formula's rotated q over the cache it wrote (K/V after _torch)."""
    cos, sin = rope_tables(pos, inv_freq, q.dtype)
    half = q.shape[-1] // 2
    qr = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
    p = int(pos)
    lo = max(0, p + 1 - window) if window else 0
    heads, kvh = q.shape[1], K.shape[1]
    Kd, Vd = K[lo:p + 1].double(), V[lo:p + 1].double()  # [n, kvh, d]
    qd = qr[0].double().view(kvh, heads // kvh, -1)
    s = torch.einsum("hgd,nhd->hgn", qd, Kd) * scale
    return torch.einsum("hgn,nhd->hgd", torch.softmax(s, -1), Vd).reshape(1, -1)


def _check(heads, kvh, d, n_ctx, dtype, positions, window=0):
    from flashmoe_plugin.kernels.decode_attention import decode_attention
    q, k, v, K, V, inv_freq = _case(heads, kvh, d, n_ctx, dtype)
    scale = 1.0 / math.sqrt(d)
    for p in positions:
        pos = torch.tensor([p], device="cuda")
        K1, V1, K2, V2 = K.clone(), V.clone(), K.clone(), V.clone()
        ref = _torch(q, k, v, K1, V1, pos, inv_freq, window, scale)
        cos, sin = rope_tables(pos, inv_freq, dtype)
        out = decode_attention(q.reshape(1, -1), k.reshape(1, -1), v.reshape(1, -1), cos, sin, K2, V2, pos, window, scale)
        torch.cuda.synchronize()
        what = f"heads={heads} kv={kvh} d={d} n_ctx={n_ctx} {dtype} pos={p} window={window}"
        assert torch.equal(K1, K2) and torch.equal(V1, V2), what
        exact = _exact(q, k, K1, V1, pos, inv_freq, window, scale)
        err, err_torch = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
        floor = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert err <= max(1.5 * err_torch, floor), (what, err, err_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kvh,d", [(32, 8, 128), (8, 8, 64), (16, 2, 128), (16, 2, 64)])
def test_kernel_equals_the_torch_formula(heads, kvh, d, dtype):
    n_ctx = 552
    _check(heads, kvh, d, n_ctx, dtype, [0, 1, 17, 300, n_ctx - 1])


@pytest.mark.parametrize("heads,kvh,d", [(4, 2, 16), (4, 2, 32), (4, 4, 256), (32, 2, 64), (6, 2, 32)])
def test_other_head_dims_and_groups(heads, kvh, d):
    """The oracle families' small heads (16, 32), head_dim 256, 16 query heads per kv head (two
    head groups), a ratio of 3."""
    _check(heads, kvh, d, 200, torch.bfloat16, [0, 63, 199])


def test_long_context_and_window():
    _check(32, 8, 128, 8192, torch.bfloat16, [0, 4095, 8191])
    _check(8, 2, 64, 1000, torch.float32, [0, 10, 999], window=128)


def test_a_captured_graph_replays_at_new_positions():
    """The position is read on the device: one capture, replayed after pos.fill_(p), equals the
    formula at p each time (the chunk tickets reset themselves between launches)."""
    from flashmoe_plugin.kernels.decode_attention import decode_attention
    heads, kvh, d, n_ctx, dt = 32, 8, 128, 552, torch.bfloat16
    q, k, v, K, V, inv_freq = _case(heads, kvh, d, n_ctx, dt, seed=3)
    scale = 1.0 / math.sqrt(d)
    Kg, Vg = K.clone(), V.clone()
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cos, sin = rope_tables(pos, inv_freq, dt)
        decode_attention(q.reshape(1, -1), k.reshape(1, -1), v.reshape(1, -1), cos, sin, Kg, Vg, pos, 0, scale)
        _torch(q, k, v, K, V, pos, inv_freq, 0, scale)  # the same warm-up write at 0 in the reference cache
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            cos, sin = rope_tables(pos, inv_freq, dt)
            out = decode_attention(q.reshape(1, -1), k.reshape(1, -1), v.reshape(1, -1), cos, sin, Kg, Vg, pos, 0,
                                   scale)
    torch.cuda.current_stream().wait_stream(s)
    for p in (5, 0, 551, 200, 200):
        pos.fill_(p)
        graph.replay()
        ref = _torch(q, k, v, K, V, torch.tensor([p], device="cuda"), inv_freq, 0, scale)
        torch.cuda.synchronize()
        assert torch.equal(K, Kg) and torch.equal(V, Vg), p
        assert (out.float() - ref.float()).abs().max().item() < 3e-2, p
    first = out.clone()
    graph.replay()
    assert torch.equal(out, first)  # deterministic: the same bits at the same position


def test_bad_input_is_refused_by_name():
    from flashmoe_plugin.kernels.decode_attention import decode_attention
    q, k, v, K, V, inv_freq = _case(8, 2, 64, 16, torch.bfloat16)
    pos = torch.tensor([3], device="cuda")
    cos, sin = rope_tables(pos, inv_freq, torch.bfloat16)
    with pytest.raises(TypeError, match="q is torch.float32"):
        decode_attention(q.float().reshape(1, -1), k.reshape(1, -1), v.reshape(1, -1), cos, sin, K, V, pos, 0, 0.1)
    with pytest.raises(ValueError, match="k has"):
        decode_attention(q.reshape(1, -1), k.reshape(1, -1)[:, :64], v.reshape(1, -1), cos, sin, K, V, pos, 0, 0.1)


@pytest.mark.parametrize("cluster", [True, False])
@pytest.mark.parametrize("splits", [1, 3, 16, 128])
def test_split_counts(splits, cluster):
    """One chunk (every tile of the cache in one block: the next tile's loads in flight, the
    position's k and v from shared memory in a later tile), an odd count, the largest cluster, the
    most chunks (the merge of 128 partials); tile edges 31/32/33. The chunks merged in a cluster's
    distributed shared memory (sm_90, up to 16 chunks) or by the last block through global memory."""
    from flashmoe_plugin.kernels.decode_attention import tune
    old, old_ctx = tune("splits", splits), tune("cluster_ctx", 1 << 20 if cluster else 0)
    try:
        _check(32, 8, 128, 552, torch.bfloat16, [0, 31, 32, 33, 551])
        used = tune("last_cluster")
        _check(8, 1, 64, 300, torch.float16, [1, 150, 299])
    finally:
        tune("splits", old)
        tune("cluster_ctx", old_ctx)
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    assert used == (splits if cluster and sm90 and 1 < splits <= 16 else 0), used


def test_cluster_merge_at_long_contexts():
    """The cluster's merge (sm_90) with long chunks, a window and GQA 8 (head_dim 64: 8 lanes per
    position), where the automatic choice would take the last block's merge."""
    from flashmoe_plugin.kernels.decode_attention import tune
    old = tune("cluster_ctx", 1 << 20)
    try:
        _check(32, 8, 128, 8192, torch.bfloat16, [0, 100, 4095, 8191])
        _check(64, 8, 64, 3000, torch.float16, [2999])
        _check(8, 2, 64, 1000, torch.float32, [0, 10, 999], window=128)
    finally:
        tune("cluster_ctx", old)
    assert tune("last_cluster") == (16 if torch.cuda.get_device_capability()[0] >= 9 else 0)
