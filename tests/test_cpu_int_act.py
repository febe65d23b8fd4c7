"""Decode of q4 / q8 weights with integer activations (csrc/cpu/fm_kernels_xi.c) against float64.

One token's activations are 21-bit integers per group of 64 (three int8 digits) and the dots are
integer (VNNI / vpmaddubsw / portable C); the bound is the fp32 kernels' (max |err| / max |ref|
<= 1e-5, test_cpu_kernels.py), at every ISA level, with the fp32 decode path kept beside it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashmoe_plugin import quant
from flashmoe_plugin.store.layout import RecordLayout

from test_cpu_kernels import TOL, K, isa, make_record, random_part, ref_ffn, rel_err  # noqa: F401

pytestmark = pytest.mark.skipif(K is None, reason="the C kernels are not built (see test_cpu_kernels.py)")

# cols/64 odd leaves a lone group after AVX-512's pairs; 7232 columns (113 groups) are long rows:
# column blocks of 60 + 53 groups, four rows at a time, 13 rows leave a remainder row
SHAPES = [(67, 192), (5, 64), (130, 448), (8, 1024), (13, 7232), (33, 4096)]


@pytest.fixture
def act_mode():
    before = K.int_act()
    yield K.set_int_act
    K.set_int_act(before)


def test_int_act_is_the_default():
    assert K.int_act() is True


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_decode_matches_reference_both_modes(isa, act_mode, fmt):
    torch.manual_seed(11)
    for rows, cols in SHAPES:
        part = random_part(fmt, (rows, cols))
        ref = None
        out = {}
        for on in (True, False):
            act_mode(on)
            x = torch.randn(1, cols, generator=torch.Generator().manual_seed(rows * cols))
            if ref is None:
                ref = x.double() @ quant.dequantize(part, fmt, (rows, cols), torch.float64).T
            out[on] = K.linear(x, part, fmt, (rows, cols))
            assert rel_err(out[on], ref) <= TOL, (isa, fmt, rows, cols, on)
        assert not torch.equal(out[True], out[False]), "the integer path did not run"


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_moe_decode_matches_reference_both_modes(isa, act_mode, fmt):
    torch.manual_seed(12)
    H, I = 192, 320  # 3 and 5 groups: lone groups in both phases
    layout = RecordLayout.build(fmt, H, I)
    spec = K.ExpertSpec.from_layout(layout)
    recs = [make_record(layout) for _ in range(3)]
    x = torch.randn(1, H)
    wts = torch.rand(3)
    ref = sum(float(w) * ref_ffn(x, r, layout) for w, r in zip(wts, recs))
    for on in (True, False):
        act_mode(on)
        out = torch.zeros(1, H)
        K.moe(x, recs, wts, spec, out)
        assert rel_err(out, ref) <= TOL, (isa, fmt, on)


def test_mixed_formats_decode(act_mode):
    # w13 in q8 and w2 in q4 (each matrix picks its own path) and w13 in q2 (fp32 path) with q8 w2
    torch.manual_seed(13)
    H, I = 128, 192
    for f13, f2 in (("q8", "q4"), ("q2", "q8")):
        p13, p2 = random_part(f13, (2 * I, H), 0.1), random_part(f2, (H, I), 0.1)
        rec = torch.cat([p13, p2])
        spec = K.ExpertSpec((f13, 0, (2 * I, H)), (f2, p13.numel(), (H, I)))
        x = torch.randn(1, H)
        g, u = (x.double() @ quant.dequantize(p13, f13, (2 * I, H), torch.float64).T).chunk(2, -1)
        ref = (F.silu(g) * u) @ quant.dequantize(p2, f2, (H, I), torch.float64).T
        assert rel_err(K.expert_ffn(x, rec, spec), ref) <= TOL, (f13, f2)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_special_activation_groups(isa, fmt):
    # per group: zeros, values near the float minimum (step computed in double), huge values,
    # magnitudes 1e-3 .. 1e3 in one group, ordinary values; then inf and NaN give NaN rows
    torch.manual_seed(14)
    rows, cols = 9, 6 * 64
    part = random_part(fmt, (rows, cols))
    W = quant.dequantize(part, fmt, (rows, cols), torch.float64)
    x = torch.randn(1, cols)
    x[0, :64] = 0
    x[0, 64:128] *= 1e-36
    x[0, 128:192] *= 1e30
    x[0, 192:256] = torch.logspace(-3, 3, 64) * torch.sign(torch.randn(64))
    y = K.linear(x, part, fmt, (rows, cols))
    ref = x.double() @ W.T
    assert rel_err(y, ref) <= TOL
    tiny = x.clone()
    tiny[0, 128:] = 0  # the result is then the tiny group's (and the zeros'): still within 1e-5
    assert rel_err(K.linear(tiny, part, fmt, (rows, cols)), tiny.double() @ W.T) <= TOL
    for bad in (float("inf"), float("nan")):
        xb = x.clone()
        xb[0, 300] = bad
        assert torch.isnan(K.linear(xb, part, fmt, (rows, cols))).all()


def test_int_act_isa_levels_agree_and_threads_bitwise(act_mode):
    torch.manual_seed(15)
    act_mode(True)
    before_isa, before_n = K.isa(), K.get_num_threads()
    part = random_part("q4", (45, 7232))
    x = torch.randn(1, 7232)
    try:
        by_level = {}
        for level in K.isa_levels():
            K.set_isa(level)
            by_level[level] = K.linear(x, part, "q4", (45, 7232))
            for n in (1, 3):  # a row is computed by one thread in one order, four rows or one
                K.set_num_threads(n)
                assert torch.equal(K.linear(x, part, "q4", (45, 7232)), by_level[level]), (level, n)
            K.set_num_threads(before_n)
    finally:
        K.set_isa(before_isa)
        K.set_num_threads(before_n)
    for level, y in by_level.items():
        assert rel_err(y, by_level["portable"].double()) <= TOL, level
