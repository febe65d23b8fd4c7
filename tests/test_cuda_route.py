"""One MoE layer's routing in one CUDA launch (kernels/route.py, csrc/cuda/fm_route.cu) against
runtime/decode_ops.py's torch code, its CPU twin: the residual add, the FFN norm, the router,
softmax, top-k (normalised or not) and the records' addresses from the slot table's row.
Skipped without a CUDA GPU (CI has none)."""
import pytest
import torch

from flashmoe_plugin.kernels import compiled
from flashmoe_plugin.runtime import decode_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or compiled("_route_cuda")[0] is None,
                                reason="needs an NVIDIA GPU visible to torch and the _route_cuda module (none here)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,E,k,normalize", [(4096, 8, 2, True), (2048, 128, 8, True), (1024, 60, 4, False),
                                             (4096, 512, 10, True), (64, 3, 1, False)])
def test_route_equals_the_torch_code(dtype, H, E, k, normalize):
    from flashmoe_plugin.kernels.route import route_decode, workspace
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(H + E + k)
    h_in = torch.randn(1, H, device=dev, generator=g).to(dtype)
    o = (0.3 * torch.randn(1, H, device=dev, generator=g)).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(H, device=dev, generator=g)).to(dtype)
    router_w = (torch.randn(E, H, device=dev, generator=g) / H ** 0.5).to(dtype)
    entries = torch.randperm(4 * E, device=dev, generator=g)[:E]
    base, stride = torch.tensor([1 << 40], dtype=torch.int64, device=dev), 3 << 20
    eps = 1e-5
    ids_row, ids_ref_row = (torch.full((k,), -1, dtype=torch.int64, device=dev) for _ in range(2))
    ws = workspace(dev, E)
    for _ in range(3):  # the workspace's ticket is reset by each launch
        h, x, ids, w, addrs = route_decode(h_in, o, norm_w, router_w, entries, base, ids_row, ws, stride, k, normalize, eps)
    h_ref = h_in + o
    x_ref, ids_ref, w_ref = decode_ops.route(h_ref, norm_w, router_w, ids_ref_row, k, normalize, eps)
    assert torch.equal(h, h_ref)
    # the squares' sum in fp64 as rms_norm: x equal but for a rare rounding boundary of the mean
    assert (x.float() - x_ref.float()).abs().max() <= 2 * torch.finfo(dtype).eps * x_ref.float().abs().max()
    # the router's dot products sum in another order: the same experts where the ranking has a margin
    probs = torch.softmax(decode_ops._dot(x_ref[:, None, :], router_w, -1).to(dtype).float(), -1)[0]
    top = probs.sort(descending=True).values
    if (top[k - 1] - top[k]) > 1e-3 and (top[:k].diff().abs() > 1e-3).all():
        assert torch.equal(ids, ids_ref) and torch.equal(ids_row, ids[0])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(w.float(), w_ref.float(), rtol=tol, atol=tol)
        assert torch.equal(addrs, decode_ops.addresses(entries, ids, base, stride))
    assert ws[:4].count_nonzero() == 0  # the ticket back at zero for the next launch


def test_route_refuses_bad_input():
    from flashmoe_plugin.kernels.route import route_decode, workspace
    dev = torch.device("cuda")
    H, E, k = 256, 8, 2
    a = torch.zeros(1, H, device=dev, dtype=torch.bfloat16)
    args = dict(norm_w=torch.ones(H, device=dev, dtype=torch.bfloat16), entries=torch.zeros(E, dtype=torch.int64, device=dev),
                base=torch.zeros(1, dtype=torch.int64, device=dev), ids_row=torch.zeros(k, dtype=torch.int64, device=dev),
                workspace=workspace(dev, E), stride=1, k=k, normalize=True, eps=1e-6)
    with pytest.raises(TypeError, match="router_w must be"):
        route_decode(a, a, router_w=torch.zeros(E, H, device=dev), **args)
    with pytest.raises(ValueError, match="k=9 of E=8"):
        route_decode(a, a, router_w=torch.zeros(E, H, device=dev, dtype=torch.bfloat16), **{**args, "k": 9})
