"""q, k and v as one stacked product (kernels/packed.py PackedStack -> the custom op
flashmoe::packed_linear_stack -> Backend.linear_stack): the CPU twin of the CUDA backend's one-
launch GEMV over the parts (tests/test_cuda_gemv.py).

Oracles: each part's own product (the stack must equal their concatenation bit for bit on CPU,
eagerly and under torch.compile, whose fake op must give the real shape), and quant.dequantize +
float64 math."""
import pytest
import torch
import torch.nn.functional as F

from flashmoe_plugin import kernels, quant
from flashmoe_plugin.kernels.packed import PackedStack, PackedWeight, concat_rows


def _backends():
    out = ["torch"]
    if kernels.all_backends()["cpu"].available()[0]:
        out.append("cpu")
    return out


def _parts(fmt, be, rows=(96, 32, 32), cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r, cols, generator=g) * 0.05 for r in rows]
    return [PackedWeight(quant.quantize(w, fmt), fmt, w.shape, be, torch.float32) for w in ws]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["q8", "q4", "q2"])
def test_stack_equals_its_parts_and_the_reference(backend, fmt):
    be = kernels.select("cpu", backend)
    parts = _parts(fmt, be)
    stack = concat_rows(parts)
    assert isinstance(stack, PackedStack) and stack.uniform and stack.shape == (160, 256)
    g = torch.Generator().manual_seed(1)
    ref = torch.cat([p.dequantize(torch.float64) for p in parts])
    for T in (1, 3, 7):
        x = torch.randn(T, 256, generator=g)
        y = stack.linear(x)
        assert torch.equal(y, torch.cat([p.linear(x) for p in parts], dim=-1))
        want = x.double() @ ref.T
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-5
    bias = torch.randn(160, generator=g)
    assert torch.equal(stack.linear(x, bias), y + bias)
    x3 = torch.randn(2, 3, 256, generator=g)  # leading dims kept
    assert torch.equal(stack.linear(x3), torch.cat([p.linear(x3) for p in parts], dim=-1))


def test_stack_under_torch_compile_has_the_real_shape_and_values():
    be = kernels.select("cpu", "torch")
    stack = concat_rows(_parts("q8", be, rows=(64, 16, 16), cols=128))
    x = torch.randn(2, 128)
    f = torch.compile(lambda v: stack.linear(v) * 2, backend="eager", fullgraph=True)
    y = f(x)
    assert y.shape == (2, 96)
    assert torch.equal(y, stack.linear(x) * 2)


def test_mixed_stack_falls_back_to_one_product_per_part():
    """A float tensor among the parts, or parts of different formats: each part its own product."""
    be = kernels.select("cpu", "torch")
    q8, q4 = _parts("q8", be, rows=(32,), cols=128)[0], _parts("q4", be, rows=(16,), cols=128, seed=2)[0]
    w = torch.randn(8, 128)
    for parts in ([q8, w], [q8, q4]):
        stack = concat_rows(parts)
        assert isinstance(stack, PackedStack) and not stack.uniform
        x = torch.randn(1, 128)
        want = torch.cat([F.linear(x, p) if isinstance(p, torch.Tensor) else p.linear(x) for p in parts], dim=-1)
        assert torch.equal(stack.linear(x), want)
    assert isinstance(concat_rows([w, w]), torch.Tensor)
