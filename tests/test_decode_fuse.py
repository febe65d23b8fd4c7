"""How runtime/decode_ops calls the decode layer's folds (kernels/decode_fuse.py: the attention norm
inside the q/k/v GEMV, the routing in one kernel), checked on the CPU: the compiled module's two
calls are stood in for by the torch formulas, so what is tested is the integration CI can run: the
ops' schemas and fakes (torch.library.opcheck), that the step compiled with Ops' settings hands
them the step's own hs_row / ids_row (written in place) and gives what the unfolded formulas give,
and the arithmetic the kernels copy from models.layers.rms_norm. The kernels against the formulas:
tests/test_cuda_decode_fuse.py (GPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flashmoe_plugin import quant
from flashmoe_plugin.kernels import decode_fuse as df
from flashmoe_plugin.kernels import select
from flashmoe_plugin.kernels.packed import PackedStack, PackedWeight
from flashmoe_plugin.models.layers import rms_norm
from flashmoe_plugin.runtime import decode_ops

H, KVH, D, HID, E, K = 4, 2, 16, 64, 8, 2


class _Formula:
    """_kernels_cuda's gemv_norm and route as the torch formulas; records the buffers written."""
    GEMV_MAX_PARTS, ROUTE_MAX_H, ROUTE_MAX_E = 4, 8192, 1024

    def __init__(self):
        self.seen = []

    def gemv_norm(self, parts, fmt, rows, cols, h, hd, nw, eps, hs, out, stream):
        self.seen.append(("hs", hs.data_ptr()))
        hs.copy_(h + hd)
        w = torch.cat([quant.dequantize(p, fmt, (r, cols), torch.float32) for p, r in zip(parts, rows)])
        out.copy_(rms_norm(hs.view(1, -1), nw, eps) @ w.T)

    def route(self, h, o, nw, router, k, eps, norm_topk, entries, base, stride, h2, x, weights, ids, ids_row, addrs,
              stream):
        self.seen.append(("ids_row", ids_row.data_ptr()))
        h2.copy_(h + o)
        xx, i, w = decode_ops.route(h2.view(1, -1), nw, router, ids_row, k, norm_topk, eps)
        x.copy_(xx.view(-1))
        weights.copy_(w.view(-1))
        ids.copy_(i.view(-1))
        addrs.copy_(decode_ops.addresses(entries, i, base, stride))


class _AsCuda:
    """The torch backend under the CUDA backend's name and GEMV predicate (takes_norm_qkv reads them)."""
    name = "cuda"

    def __init__(self):
        self._b = select("cpu", "torch")

    def _gemv_takes(self, x, fmt, cols, rows=None):
        return x.shape[0] == 1 and fmt in ("q8", "q4")

    def __getattr__(self, name):
        return getattr(self._b, name)


@pytest.fixture
def formula(monkeypatch):
    f = _Formula()
    monkeypatch.setattr(df, "_km", f)
    monkeypatch.setattr(df, "_MAX_PARTS", 4)
    monkeypatch.setattr(df, "_ROUTE_MAX_H", 8192)
    monkeypatch.setattr(df, "_ROUTE_MAX_E", 1024)
    monkeypatch.setattr(df, "_row", lambda h: h.dim() == 2 and h.shape[0] == 1)  # CPU rows stand in
    monkeypatch.setattr(df, "_stream", lambda t: 0)
    return f


def _layer(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    parts = [PackedWeight.quantize(r(n * D, HID) * 0.2, "q8", backend, torch.float32, fit="absmax")
             for n in (H, KVH, KVH)]
    args = dict(norm_w=1 + 0.1 * r(HID), wqkv=PackedStack(parts), bqkv=None, q_norm=None, k_norm=None,
                K=torch.zeros(16, KVH, D), V=torch.zeros(16, KVH, D), wo=r(HID, H * D) * 0.1)
    pos, inv = torch.tensor([3]), 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = decode_ops.rope_tables(pos, inv, torch.float32)
    kw = dict(ffn_norm=1 + 0.1 * r(HID), router_w=r(E, HID), entries_row=torch.randperm(E, generator=g),
              base=torch.tensor([1 << 20]), top_k=K, norm_topk=True, stride=4096, cos=cos, sin=sin, pos=pos,
              kpos=torch.arange(16), heads=H, kv_heads=KVH, head_dim=D, eps=1e-6, qk_norm="", clip=None, window=0,
              scale=1 / math.sqrt(D), **args)
    return r(1, HID), r(1, HID), kw


def test_the_ops_schemas_and_fakes(formula):
    h, delta, kw = _layer(_AsCuda())
    parts = kw["wqkv"].parts
    torch.library.opcheck(torch.ops.flashmoe.norm_gemv_stack.default,
                          (h, delta, torch.zeros(1, HID), kw["norm_w"], [p.data for p in parts], "q8",
                           [p.shape[0] for p in parts], HID, 1e-6))
    torch.library.opcheck(torch.ops.flashmoe.decode_route.default,
                          (h, delta, kw["ffn_norm"], kw["router_w"], torch.zeros(K, dtype=torch.long),
                           kw["entries_row"], kw["base"], 4096, 1e-6, K, True))


def test_the_folds_are_taken_only_where_the_kernels_compute(formula):
    h, delta, kw = _layer(_AsCuda())
    assert df.takes_norm_qkv(h, delta, kw["norm_w"], kw["wqkv"])
    assert df.takes_route(h, kw["ffn_norm"], kw["router_w"], K)
    assert not df.takes_norm_qkv(h, delta, kw["norm_w"], torch.zeros(128, HID))  # float q/k/v: the formula
    assert not df.takes_norm_qkv(torch.zeros(2, HID), torch.zeros(2, HID), kw["norm_w"], kw["wqkv"])  # 2 tokens
    assert not df.takes_route(h, kw["ffn_norm"], kw["router_w"].half(), K)  # router of another dtype
    assert not df.takes_route(h, kw["ffn_norm"], kw["router_w"], E + 1)
    _, _, torch_kw = _layer(select("cpu", "torch"))
    assert not df.takes_norm_qkv(h, delta, kw["norm_w"], torch_kw["wqkv"])  # not the CUDA backend's parts


def test_the_compiled_step_writes_in_place_and_equals_the_formulas(formula):
    h, delta, kw = _layer(_AsCuda())
    _, _, ref_kw = _layer(select("cpu", "torch"))  # the same weights through the unfolded formulas
    decode_ops.Ops.get(compile=True)  # inductor's settings as the decode step has them
    step = torch.compile(decode_ops.moe_layer, dynamic=False, fullgraph=True)
    hs, ids = torch.zeros(2, 1, HID), torch.zeros(2, K, dtype=torch.long)
    with torch.inference_mode():
        got = step(h, delta, hs[0], ids_row=ids[0], fold=3, **kw)
        ref = decode_ops.moe_layer(h, delta, hs[1], ids_row=ids[1], fold=0, **ref_kw)
    assert ("hs", hs[0].data_ptr()) in formula.seen and ("ids_row", ids[0].data_ptr()) in formula.seen
    assert torch.equal(hs[0], hs[1]) and torch.equal(ids[0], ids[1])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_kernels_norm_arithmetic_is_rms_norms():
    """fm_gemv.cu / fm_route.cu compute the scale as 1.0f / (float)sqrt((double)(mean + eps)) with the
    mean of the fp64 sum rounded to fp32, then round x * scale and (that) * w to the dtype: what
    models.layers.rms_norm gives, bit for bit (if it changes, the kernels must follow)."""
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 40.0):
        x = (torch.randn(64, 4096, generator=g) * scale).bfloat16()
        w = (1 + 0.1 * torch.randn(4096, generator=g)).bfloat16()
        xf = x.float().numpy()
        mean = ((xf * xf).astype(np.float64).sum(-1, keepdims=True) / 4096).astype(np.float32)
        s = np.float32(1.0) / np.sqrt((mean + np.float32(1e-5)).astype(np.float64)).astype(np.float32)
        y = (torch.from_numpy(xf * s).bfloat16().float() * w.float()).bfloat16()
        assert torch.equal(rms_norm(x, w, 1e-5), y), scale
