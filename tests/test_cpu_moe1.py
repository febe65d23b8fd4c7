"""The one-pass decode of moe() (csrc/cpu/fm_moe1.c) against float64 and the two-phase path.

One token of q4 / q8 experts with integer activations on 2+ threads runs as one task list: every
expert's gate/up chunks (SwiGLU and the chunk's preparation included), then every expert's
down-projection row blocks, each waiting only for its own expert's chunks. Checked at every ISA
level: the 1e-5 bound of the kernels, that the path ran (moe1_count), and that its bits equal the
two-phase path's for any thread count and task size (same kernels, same summation order);
prefill, one thread and fp32 activations keep the two-phase path.
"""
from __future__ import annotations

import pytest
import torch

from flashmoe_plugin.store.layout import RecordLayout

from test_cpu_kernels import TOL, K, isa, make_record, ref_ffn, rel_err  # noqa: F401

pytestmark = pytest.mark.skipif(K is None, reason="the C kernels are not built (see test_cpu_kernels.py)")

# (H, I, k): I = 1216 and 7232 have an odd group count (a lone last group, after AVX-512's pairs);
# 7232 is a long row (column blocks in w2's kernel); H = 200 rows leave a short last row block
CASES = [(192, 1216, 2), (128, 7232, 1), (256, 2048, 3), (64, 320, 2)]


@pytest.fixture
def settings():
    before = (K.moe1(), K.get_num_threads(), K.int_act())
    yield
    K.set_moe1(before[0])
    K.set_num_threads(before[1])
    K.set_int_act(before[2])


def _layer(fmt, H, I, k, seed):
    torch.manual_seed(seed)
    layout = RecordLayout.build(fmt, H, I)
    recs = [make_record(layout) for _ in range(k)]
    wts = torch.rand(k) + 0.1
    return layout, K.ExpertSpec.from_layout(layout), recs, wts


def _moe(x, recs, wts, spec, tasks, threads):
    K.set_moe1(tasks)
    K.set_num_threads(threads)
    out = torch.full((x.shape[0], spec.H), 0.25)  # moe() adds to out
    K.moe(x, recs, wts, spec, out)
    return out


def test_default_is_on():
    assert K.moe1() == 4


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_one_pass_matches_reference_and_two_phases_bitwise(isa, settings, fmt):
    for n, (H, I, k) in enumerate(CASES):
        layout, spec, recs, wts = _layer(fmt, H, I, k, 100 + n)
        x = torch.randn(1, H)
        ref = 0.25 + sum(float(w) * ref_ffn(x, r, layout) for w, r in zip(wts, recs))
        two = _moe(x, recs, wts, spec, 0, 2)
        assert rel_err(two - 0.25, ref - 0.25) <= TOL, (isa, fmt, H, I, k)
        for tasks, threads in ((4, 2), (1, 3), (8, 2), (64, 3)):
            before = K.moe1_count()
            one = _moe(x, recs, wts, spec, tasks, threads)
            assert K.moe1_count() == before + 1, "the one-pass path did not run"
            assert torch.equal(one, two), (isa, fmt, H, I, k, tasks, threads)


def test_prefill_single_thread_and_fp32_keep_two_phases(settings):
    layout, spec, recs, wts = _layer("q4", 128, 2048, 2, 7)
    before = K.moe1_count()
    _moe(torch.randn(3, 128), recs, wts, spec, 4, 2)  # T > 1
    _moe(torch.randn(1, 128), recs, wts, spec, 4, 1)  # one thread
    K.set_int_act(False)
    _moe(torch.randn(1, 128), recs, wts, spec, 4, 2)  # fp32 activations
    assert K.moe1_count() == before


def test_nan_activation_reaches_every_output(settings):
    layout, spec, recs, wts = _layer("q8", 128, 2048, 2, 8)
    x = torch.randn(1, 128)
    x[0, 5] = float("nan")
    assert torch.isnan(_moe(x, recs, wts, spec, 4, 2)).all()
