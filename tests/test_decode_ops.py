"""The decode step's routing and attention written as reductions (runtime/decode_ops.py), against
torch's own ops: top_k_of against torch.topk, the router and attention sums against matmuls.
(The whole step against the engine's ordinary path and the pager path: test_graph_decode.py.)"""
import pytest
import torch

from flashmoe_plugin.runtime.decode_ops import _dot, top_k_of


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (64, 4), (64, 6), (128, 8)])
def test_top_k_of_equals_torch_topk(E, k):
    g = torch.Generator().manual_seed(E * 10 + k)
    for _ in range(50):
        p = torch.softmax(torch.randn(1, E, generator=g) * 2, dim=-1)
        vals, ids = top_k_of(p, k)
        want_vals, want_ids = torch.topk(p, k, dim=-1)
        assert torch.equal(vals, want_vals) and torch.equal(ids, want_ids)
        w, i = top_k_of(p, k, normalize=True)
        assert torch.equal(i, want_ids)
        torch.testing.assert_close(w, want_vals / want_vals.sum(dim=-1, keepdim=True), rtol=1e-6, atol=0)


def test_top_k_of_ties_go_to_the_lower_id():
    p = torch.tensor([[0.1, 0.3, 0.05, 0.3, 0.2, 0.05]])
    vals, ids = top_k_of(p, 4)
    assert ids.tolist() == [[1, 3, 4, 0]] and torch.equal(vals, torch.tensor([[0.3, 0.3, 0.2, 0.1]]))
    assert top_k_of(torch.full((1, 8), 0.125), 3)[1].tolist() == [[0, 1, 2]]


def test_dot_is_the_matmul():
    g = torch.Generator().manual_seed(3)
    q, K = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 1, 40, 16, generator=g)
    torch.testing.assert_close(_dot(q, K, -1), (q @ K.transpose(-1, -2)).squeeze(-2))
    p, V = torch.randn(2, 4, 40, 1, generator=g), torch.randn(2, 1, 40, 16, generator=g)
    torch.testing.assert_close(_dot(p, V, -2), (p.transpose(-1, -2) @ V).squeeze(-2))
    x, W = torch.randn(1, 32, generator=g, dtype=torch.bfloat16), torch.randn(8, 32, generator=g, dtype=torch.bfloat16)
    assert _dot(x[:, None, :], W, -1).dtype == torch.float32
    torch.testing.assert_close(_dot(x[:, None, :], W, -1).to(torch.bfloat16), torch.nn.functional.linear(x, W))


def test_rotate_half_equals_the_models():
    from flashmoe_plugin.models.layers import rotate_half
    from flashmoe_plugin.runtime.decode_ops import _rotate_half
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert torch.equal(_rotate_half(x), rotate_half(x))
