"""How runtime/decode_ops.attention calls the fused decode-attention kernel (the custom op
flashmoe::decode_attention, kernels/decode_attention.py), checked on the CPU: the kernel itself is
stood in for by its torch formula (decode_ops.attend), so what is tested is the integration CI
can run: the op's schema and fake (torch.library.opcheck), and that the step compiled by
torch.compile with Ops' settings hands the op the engine's own K/V caches (written in place, no
copy) and gives what the uncompiled formula gives. The kernel against the formula:
tests/test_cuda_decode_attention.py (GPU)."""
from __future__ import annotations

import math

import pytest
import torch

from flashmoe_plugin.kernels import decode_attention as fa
from flashmoe_plugin.runtime import decode_ops

H, KVH, D, N, HID = 8, 2, 32, 40, 64


class _Formula:
    """The compiled module's two calls, as the torch formula; records the caches it was given."""

    def __init__(self):
        self.seen = []

    def workspace_bytes(self, heads, kv_heads, head_dim, n_ctx, device):
        return 256

    def decode_attention(self, q, k, v, cos, sin, K, V, pos, window, scale, out, workspace):
        self.seen.append((K.data_ptr(), V.data_ptr()))
        kpos = torch.arange(K.shape[0])
        out.copy_(decode_attention_formula(q, k, v, cos, sin, K, V, pos, kpos, window, scale))


def decode_attention_formula(q, k, v, cos, sin, K, V, pos, kpos, window, scale):
    d = K.shape[2]
    return decode_ops.attend(q.view(1, -1, d), k.view(1, -1, d), v.view(1, -1, d), cos, sin, K, V, pos, kpos,
                             window, scale)


@pytest.fixture
def formula(monkeypatch):
    f = _Formula()
    monkeypatch.setattr(fa, "_km", f)
    monkeypatch.setattr(fa, "takes", lambda K, heads, dtype: True)
    monkeypatch.setattr(fa, "_workspace", lambda heads, K: torch.zeros(256, dtype=torch.uint8))
    return f


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = dict(norm_w=torch.ones(HID), wqkv=r((H + 2 * KVH) * D, HID) * 0.2, bqkv=None, q_norm=None, k_norm=None,
                K=r(N, KVH, D), V=r(N, KVH, D), wo=r(HID, H * D) * 0.1)
    consts = dict(heads=H, kv_heads=KVH, head_dim=D, eps=1e-6, qk_norm="", clip=None, window=0, scale=1 / math.sqrt(D))
    return r(1, HID), args, consts


def test_the_op_schema_and_fake(formula):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, H * D, generator=g), torch.randn(1, KVH * D, generator=g), torch.randn(1, KVH * D,
                                                                                                     generator=g)
    pos = torch.tensor([7])
    cos, sin = decode_ops.rope_tables(pos, 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)), torch.float32)
    K, V = torch.randn(N, KVH, D, generator=g), torch.randn(N, KVH, D, generator=g)
    torch.library.opcheck(torch.ops.flashmoe.decode_attention.default, (q, k, v, cos, sin, K, V, pos, 0, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_compiled_step_writes_the_engine_caches_in_place(formula):
    decode_ops.Ops.get(compile=True)  # inductor's settings as the decode step has them
    h, args, consts = _layer()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    step = torch.compile(decode_ops.attention, dynamic=False, fullgraph=True)
    K0, V0 = args["K"].clone(), args["V"].clone()
    for p in (0, 5, N - 1):
        pos = torch.tensor([p])
        cos, sin = decode_ops.rope_tables(pos, inv_freq, torch.float32)
        at = dict(cos=cos, sin=sin, pos=pos, kpos=torch.arange(N), **consts)
        formula.seen.clear()
        out = step(h, torch.zeros(1, HID), torch.zeros(1, HID), **args, **at)
        assert formula.seen == [(args["K"].data_ptr(), args["V"].data_ptr())]  # the caches themselves
        ref_args = dict(args, K=K0, V=V0)
        with pytest.MonkeyPatch.context() as m:  # the uncompiled torch formula, on copies
            m.setattr(fa, "takes", lambda K, heads, dtype: False)
            ref = decode_ops.attention(h, torch.zeros(1, HID), torch.zeros(1, HID), **ref_args, **at)
        assert torch.equal(args["K"], K0) and torch.equal(args["V"], V0), p
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_takes_only_cuda_caches_of_its_shapes():
    K = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    assert not fa.takes(K, 8, torch.bfloat16)  # a CPU cache: the torch formula (the CI twin)
    if fa.ENABLED and torch.cuda.is_available():
        Kc = K.cuda()
        assert fa.takes(Kc, 8, torch.bfloat16)
        assert not fa.takes(Kc, 8, torch.float16)  # q's dtype must be the cache's
        assert not fa.takes(Kc, 7, torch.bfloat16)  # heads a multiple of kv_heads
        assert not fa.takes(torch.zeros(4, 2, 96, device="cuda"), 8, torch.float32)  # head_dim 96
