"""The native CPU kernels (flashmoe_plugin._cpu_kernels) against the quant.py reference.

Every format and every instruction-set level usable here (portable C, AVX2, AVX-512) on random
data, with odd shapes that exercise the vector tails; errors for bad arguments. The reference is
quant.dequantize + float64 math; the kernels accumulate in fp32, so the bound is a relative error
(max |err| / max |ref|) of 1e-5.
"""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch
import torch.nn.functional as F

from flashmoe_plugin import quant
from flashmoe_plugin.store.layout import RecordLayout

try:
    from flashmoe_plugin import _cpu_kernels as K
    _WHY = ""
except ImportError as e:  # pragma: no cover - depends on the build
    K, _WHY = None, str(e)

pytestmark = pytest.mark.skipif(K is None, reason=f"the C kernels are not tested: flashmoe_plugin._cpu_kernels "
                                f"is not built ({_WHY})")

FORMATS = ["f32", "f16", "bf16", "q8", "q4", "q2"]
ISAS = ["portable", "avx2", "avx512"]
TOL = 1e-5


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def make_part(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """A part holding w: raw bytes (padded to the part size) or quant.quantize's packing."""
    if fmt in quant.RAW_DTYPES:
        raw = w.to(quant.RAW_DTYPES[fmt]).contiguous().view(-1).view(torch.uint8)
        buf = torch.zeros(quant.part_nbytes(fmt, w.shape), dtype=torch.uint8)
        buf[:raw.numel()] = raw
        return buf
    return quant.quantize(w, fmt)


def random_part(fmt: str, shape, scale: float = 1.0) -> torch.Tensor:
    """A part of random content: every code, sign and nibble pattern occurs (and it is much faster
    to make than quantizing; the kernels see bytes either way)."""
    if fmt in quant.RAW_DTYPES:
        return make_part(torch.randn(shape) * scale, fmt)
    buf = torch.zeros(quant.part_nbytes(fmt, shape), dtype=torch.uint8)
    v = quant.views(buf, fmt, shape)
    if fmt == "q8":
        v["q"].copy_(torch.randint(-127, 128, v["q"].shape, dtype=torch.int8))
    else:
        v["q"].copy_(torch.randint(0, 256, v["q"].shape, dtype=torch.uint8))
        v["biases"].copy_((torch.randn(v["biases"].shape) * scale).half())
    levels = {"q8": 127, "q4": 15, "q2": 3}[fmt]
    v["scales"].copy_((torch.randn(v["scales"].shape) * scale / levels).half())
    return buf


def make_record(layout: RecordLayout, scale: float = 0.1) -> torch.Tensor:
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for p in layout.parts:
        b = random_part(p.format, p.shape, scale)
        rec[p.offset:p.offset + b.numel()] = b
    return rec


def ref_ffn(x: torch.Tensor, rec: torch.Tensor, layout: RecordLayout) -> torch.Tensor:
    w = {p.name: quant.dequantize(layout.part_bytes(rec, p.name), p.format, p.shape, torch.float64)
         for p in layout.parts}
    g, u = (x.double() @ w["w13"].T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w["w2"].T


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in K.isa_levels():
        pytest.skip(f"the {request.param} kernels are not run: this CPU lacks {request.param} (its best level is "
                    f"{K.max_isa()})")
    before = K.isa()
    K.set_isa(request.param)
    yield request.param
    K.set_isa(before)


def shapes_for(fmt):
    if fmt in quant.RAW_DTYPES:
        return [(67, 195), (3, 7), (16, 64), (9, 1)]
    # cols/64 = 3 and 7 leave lone groups / pairs after the widest SIMD blocks
    return [(67, 192), (5, 64), (130, 448), (8, 1024)]


# ------------------------------------------------------------------------------ geometry

@pytest.mark.parametrize("fmt", FORMATS)
def test_part_geometry_matches_quant(fmt):
    for rows, cols in [(67, 192), (1, 64), (14336, 4096)]:
        secs = quant.sections(fmt, (rows, cols))
        assert [(s.name, s.offset, s.nbytes) for s in secs] == K.part_sections(fmt, rows, cols)
        assert K.part_nbytes(fmt, rows, cols) == quant.part_nbytes(fmt, (rows, cols))


# ------------------------------------------------------------------------------ GEMV / GEMM

@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_reference(isa, fmt):
    torch.manual_seed(1)
    for rows, cols in shapes_for(fmt):
        part = random_part(fmt, (rows, cols))
        W = quant.dequantize(part, fmt, (rows, cols), torch.float64)
        for T in (1, 2, 5, 9, 17):  # token blocks of 1..8 and their remainders
            x = torch.randn(T, cols)
            y = K.linear(x, part, fmt, (rows, cols))
            assert y.shape == (T, rows)
            err = rel_err(y, x.double() @ W.T)
            assert err <= TOL, (isa, fmt, rows, cols, T, err)
        y1 = K.linear(x[0], part, fmt, (rows, cols))  # 1-D x
        assert y1.shape == (rows,)
        assert rel_err(y1, x[0].double() @ W.T) <= TOL


@pytest.mark.parametrize("fmt", ["q8", "q4", "q2"])
def test_long_rows_decode_matches_reference(isa, fmt):
    # rows longer than 6144 columns decode several rows at a time in column blocks (their
    # activations do not fit L1); 7232 = 113 groups makes two blocks (60 + 53, a lone group), 13
    # rows leave a remainder row, and the chunking by thread count must not change a bit
    torch.manual_seed(5)
    part = random_part(fmt, (13, 7232))
    W = quant.dequantize(part, fmt, (13, 7232), torch.float64)
    x = torch.randn(1, 7232)
    y = K.linear(x, part, fmt, (13, 7232))
    assert rel_err(y, x.double() @ W.T) <= TOL, (isa, fmt)
    before = K.get_num_threads()
    try:
        K.set_num_threads(3)
        assert torch.equal(K.linear(x, part, fmt, (13, 7232)), y)
    finally:
        K.set_num_threads(before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_real_weights(fmt):
    # parts made by quant.quantize itself (the converter's path), at the best ISA level
    torch.manual_seed(11)
    w = torch.randn(67, 192)
    part = make_part(w, fmt)
    W = quant.dequantize(part, fmt, (67, 192), torch.float64)
    x = torch.randn(3, 192)
    assert rel_err(K.linear(x, part, fmt, (67, 192)), x.double() @ W.T) <= TOL


def test_linear_alpha_accumulate_offset():
    torch.manual_seed(2)
    part = random_part("q4", (40, 128))
    padded = torch.cat([torch.zeros(100, dtype=torch.uint8), part])
    W = quant.dequantize(part, "q4", (40, 128), torch.float64)
    x = torch.randn(3, 128)
    out = torch.randn(3, 40)
    ref = out.double() + 0.5 * (x.double() @ W.T)
    K.linear(x, padded, "q4", (40, 128), out=out, offset=100, alpha=0.5, accumulate=True)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_exact(isa, fmt):
    torch.manual_seed(13)
    for rows, cols in shapes_for(fmt):
        part = random_part(fmt, (rows, cols))
        ref = quant.dequantize(part, fmt, (rows, cols))
        assert torch.equal(K.dequantize(part, fmt, (rows, cols)), ref)
        assert torch.equal(K.dequantize(part, fmt, (rows, cols), dtype=torch.bfloat16), ref.bfloat16())
    with pytest.raises(ValueError, match="dtype must be"):
        K.dequantize(part, fmt, (rows, cols), dtype=torch.float16)


def test_isa_levels_agree():
    torch.manual_seed(3)
    results = {}
    before = K.isa()
    try:
        for level in K.isa_levels():
            K.set_isa(level)
            for fmt in FORMATS:
                rows, cols = shapes_for(fmt)[0]
                torch.manual_seed(FORMATS.index(fmt))  # not hash(): str hashes are salted per process
                part = random_part(fmt, (rows, cols))
                x = torch.randn(3, cols)
                results.setdefault(fmt, {})[level] = K.linear(x, part, fmt, (rows, cols))
    finally:
        K.set_isa(before)
    for fmt, by_level in results.items():
        base = by_level["portable"].double()
        for level, y in by_level.items():
            assert rel_err(y, base) <= TOL, (fmt, level)


def test_thread_counts_give_identical_results():
    torch.manual_seed(4)
    part = random_part("q4", (333, 512))
    x = torch.randn(2, 512)
    before = K.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 5):
            K.set_num_threads(n)
            assert K.get_num_threads() == n
            outs.append(K.linear(x, part, "q4", (333, 512)))
    finally:
        K.set_num_threads(before)
    for y in outs[1:]:  # each row is computed by one thread in one order: bitwise equal
        assert torch.equal(y, outs[0])


# ------------------------------------------------------------------------------ fused experts

@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_matches_reference(isa, fmt):
    torch.manual_seed(5)
    H, I = (192, 320) if fmt.startswith("q") else (67, 45)
    layout = RecordLayout.build(fmt, H, I)
    spec = K.ExpertSpec.from_layout(layout)
    recs = [make_record(layout) for _ in range(4)]
    refs = {}
    for T in (1, 3, 9):
        x = torch.randn(T, H)
        refs = [ref_ffn(x, r, layout) for r in recs]
        # decode: k experts, one call
        wts = torch.rand(4)
        out = torch.zeros(T, H)
        K.moe(x, recs, wts, spec, out)
        ref = sum(float(w) * r for w, r in zip(wts, refs))
        assert rel_err(out, ref) <= TOL, (isa, fmt, T, "k=4")
        # prefill: one expert, accumulating into an existing output with a weight
        base = torch.randn(T, H)
        out = base.clone()
        K.expert_ffn(x, recs[1], spec, out=out, weight=0.75)
        assert rel_err(out, base.double() + 0.75 * refs[1]) <= TOL, (isa, fmt, T, "k=1")


def test_exact_size_buffers():
    # records and parts exactly as long as the layout needs (no slack after them): an
    # out-of-bounds read would show under -fsanitize=address
    torch.manual_seed(12)
    for fmt in FORMATS:
        H, I = (192, 320) if fmt.startswith("q") else (67, 45)
        layout = RecordLayout.build(fmt, H, I)
        spec = K.ExpertSpec.from_layout(layout)
        rec = make_record(layout)[:spec.min_bytes].clone()
        x = torch.randn(3, H)
        assert rel_err(K.expert_ffn(x, rec, spec), ref_ffn(x, rec, layout)) <= TOL
        rows, cols = shapes_for(fmt)[0]
        part = random_part(fmt, (rows, cols))  # exactly part_nbytes long
        W = quant.dequantize(part, fmt, (rows, cols), torch.float64)
        x = torch.randn(2, cols)
        assert rel_err(K.linear(x, part, fmt, (rows, cols)), x.double() @ W.T) <= TOL


def test_moe_large_token_count_uses_token_chunks():
    torch.manual_seed(6)
    layout = RecordLayout.build("q4", 128, 192)
    rec = make_record(layout)
    x = torch.randn(70, 128)
    y = K.expert_ffn(x, rec, K.ExpertSpec.from_layout(layout))
    assert rel_err(y, ref_ffn(x, rec, layout)) <= TOL


def test_zero_tokens():
    layout = RecordLayout.build("q4", 128, 192)
    spec = K.ExpertSpec.from_layout(layout)
    rec = make_record(layout)
    assert K.expert_ffn(torch.zeros(0, 128), rec, spec).shape == (0, 128)
    assert K.linear(torch.zeros(0, 192), random_part("q4", (64, 192)), "q4", (64, 192)).shape == (0, 64)
    with pytest.raises(ValueError, match="too short"):
        K.expert_ffn(torch.zeros(1, 128), torch.zeros(0, dtype=torch.uint8), spec)


def test_mixed_part_formats():
    # w13 and w2 may have different formats (e.g. a store converted with a per-part choice)
    torch.manual_seed(7)
    H, I = 128, 192
    p13, p2 = random_part("q8", (2 * I, H), 0.1), random_part("q2", (H, I), 0.1)
    rec = torch.cat([p13, p2])
    spec = K.ExpertSpec(("q8", 0, (2 * I, H)), ("q2", p13.numel(), (H, I)))
    x = torch.randn(2, H)
    W13 = quant.dequantize(p13, "q8", (2 * I, H), torch.float64)
    W2 = quant.dequantize(p2, "q2", (H, I), torch.float64)
    g, u = (x.double() @ W13.T).chunk(2, -1)
    assert rel_err(K.expert_ffn(x, rec, spec), (F.silu(g) * u) @ W2.T) <= TOL


def test_concurrent_python_threads():
    torch.manual_seed(8)
    layout = RecordLayout.build("q4", 128, 256)
    spec = K.ExpertSpec.from_layout(layout)
    rec = make_record(layout)
    x = torch.randn(1, 128)
    ref = K.expert_ffn(x, rec, spec)
    bad = []

    def work():
        for _ in range(50):
            if not torch.equal(K.expert_ffn(x, rec, spec), ref):
                bad.append(1)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def _child(q, part, x):
    # no torch parallel ops here: torch's OpenMP runtime itself is not fork-safe
    q.put(K.linear(x, part, "q4", (64, 128)).tolist())


def test_pool_survives_fork():
    part, x = random_part("q4", (64, 128)), torch.randn(1, 128)
    ref = K.linear(x, part, "q4", (64, 128)).tolist()  # the pool's threads are running now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, part, x))
    p.start()
    p.join(30)
    if p.is_alive():
        p.kill()
        pytest.fail("kernel call hung in a forked child")
    assert p.exitcode == 0 and q.get(timeout=5) == ref


# ------------------------------------------------------------------------------ errors

def test_errors_are_clear():
    layout = RecordLayout.build("q4", 128, 192)
    spec = K.ExpertSpec.from_layout(layout)
    rec = make_record(layout)
    x = torch.randn(1, 128)
    out = torch.zeros(1, 128)
    part = random_part("q4", (64, 128))

    with pytest.raises(ValueError, match=r"x: expected dtype torch.float32"):
        K.moe(x.double(), [rec], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"records\[0\]: expected dtype torch.uint8"):
        K.moe(x, [rec.float()], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"records\[1\]: too short"):
        K.moe(x, [rec, rec[:-5000]], [1.0, 1.0], spec, out)
    with pytest.raises(ValueError, match=r"x: expected shape \[T, 128\]"):
        K.moe(torch.randn(1, 64), [rec], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"out: expected shape"):
        K.moe(x, [rec], [1.0], spec, torch.zeros(2, 128))
    with pytest.raises(ValueError, match=r"contiguous"):
        K.moe(torch.randn(128, 2).T[:1], [rec], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"2 records but 1 weights"):
        K.moe(x, [rec, rec], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"CPU tensor"):
        K.moe(x, [torch.empty(layout.size, dtype=torch.uint8, device="meta")], [1.0], spec, out)
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        K.moe(x, [bytes(layout.size)], [1.0], spec, out)
    with pytest.raises(ValueError, match=r"1-D"):
        K.moe(x, [rec.view(1, -1)], [1.0], spec, out)

    with pytest.raises(ValueError, match=r"part: too short"):
        K.linear(torch.randn(1, 128), part[:-1], "q4", (64, 128))
    with pytest.raises(ValueError, match=r"part: too short"):
        K.linear(torch.randn(1, 128), part, "q4", (64, 128), offset=64)
    with pytest.raises(ValueError, match=r"unknown weight format 'q3'"):
        K.linear(torch.randn(1, 128), part, "q3", (64, 128))
    with pytest.raises(ValueError, match=r"multiple of 64"):
        K.linear(torch.randn(1, 100), part, "q4", (64, 100))
    with pytest.raises(ValueError, match=r"x: expected shape \[T, 128\]"):
        K.linear(torch.randn(2, 3, 128), part, "q4", (64, 128))
    with pytest.raises(ValueError, match=r"out: expected shape \[1, 64\]"):
        K.linear(torch.randn(1, 128), part, "q4", (64, 128), out=torch.zeros(1, 65))
    with pytest.raises(ValueError, match=r"2-D shape"):
        K.linear(torch.randn(1, 128), part, "q4", (64,))

    with pytest.raises(ValueError, match=r"w13 must be \[2I, H\]"):
        K.ExpertSpec(("q4", 0, (100, 128)), ("q4", 0, (128, 64)))
    with pytest.raises(ValueError, match=r"unknown level"):
        K.set_isa("sse9")


def test_unsupported_isa_is_refused():
    if K.max_isa() == "avx512":
        pytest.skip("refusing an unsupported ISA level is not tested: this CPU supports every level, avx512 included")
    with pytest.raises(ValueError, match=r"not supported on this CPU"):
        K.set_isa("avx512")


# ------------------------------------------------------------------------------ the backend

def test_cpu_backend_matches_torch_backend():
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    from flashmoe_plugin.kernels.torch_backend import TorchBackend

    cpu, ref = CpuBackend(), TorchBackend()
    assert cpu.available() == (True, "")
    assert cpu.name == "cpu" and cpu.priority > ref.priority and "cpu" in cpu.devices
    assert cpu.num_threads == torch.get_num_threads()
    torch.manual_seed(10)
    layout = RecordLayout.build("q4", 128, 192)
    recs = [make_record(layout) for _ in range(3)]
    x = torch.randn(5, 128)
    assert rel_err(cpu.expert_ffn(x, recs[0], layout), ref.expert_ffn(x, recs[0], layout).double()) <= 1e-5
    wts = torch.tensor([0.5, 0.3, 0.2])
    x1 = x[:1]
    assert rel_err(cpu.moe_decode(x1, recs, wts, layout),
                   ref.moe_decode(x1, recs, wts, layout).double()) <= 1e-5
    yb = cpu.expert_ffn(x.bfloat16(), recs[0], layout)  # other float dtypes round-trip through fp32
    assert yb.dtype == torch.bfloat16
    cpu.set_num_threads(1)
    assert cpu.num_threads == 1
    cpu.set_num_threads(torch.get_num_threads())


def test_backend_reports_missing_module(monkeypatch):
    import flashmoe_plugin.kernels.cpu_backend as cb

    monkeypatch.setattr(cb, "_load", lambda: (None, "compiled module flashmoe_plugin._cpu_kernels not built: boom"))
    ok, why = cb.CpuBackend().available()
    assert not ok and why.startswith("compiled module flashmoe_plugin._cpu_kernels not built")


# ------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("quant_fmt", ["none", "q4", "q2"])
def test_engine_logits_cpu_backend_equal_torch_backend(oracles, quant_fmt):
    # the whole engine on a converted store: the native backend in place of the torch reference
    from flashmoe_plugin.runtime.engine import Engine

    store = oracles("mixtral").store(quant_fmt)
    ids = torch.randint(3, 384, (12,), generator=torch.Generator().manual_seed(3))
    ref = Engine(store, backend="torch")
    eng = Engine(store, backend="cpu")
    assert eng.backend.name == "cpu"
    torch.testing.assert_close(eng.forward(ids), ref.forward(ids), atol=1e-4, rtol=0)  # prefill
    torch.testing.assert_close(eng.forward(ids[:1]), ref.forward(ids[:1]), atol=1e-4, rtol=0)  # decode
