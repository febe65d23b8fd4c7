"""Gated DeltaNet: the linear-attention token mixer of the hybrid stacks (Qwen3-Next, Qwen3.5).

Instead of a KV cache a DeltaNet layer keeps two states of constant size: the last K-1 inputs of
its causal depthwise conv1d (conv_dim x (K-1)) and the recurrent state S (value heads x dk x dv,
fp32). For each token, after conv + SiLU, L2-normalised q and k (q scaled by dk^-1/2),
beta = sigmoid(b) and the decay g = -exp(A_log) * softplus(a + dt_bias):

    S <- exp(g) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T q

Decode runs that recurrence; prefill runs its chunked form (64 tokens per chunk: a triangular
solve inside a chunk, the state across chunks), as the reference implementations do. The output
goes through an RMSNorm gated by SiLU(z), then out_proj."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import linear

CHUNK = 64


def conv_dim(c) -> int:
    return 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim


def state_shapes(c) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(conv state, recurrent state) shapes of one DeltaNet layer: constant in the context length."""
    return (conv_dim(c), c.linear_conv_kernel - 1), (c.linear_num_value_heads, c.linear_key_head_dim,
                                                     c.linear_value_head_dim)


def ungroup_projections(w: dict, p: str, c) -> None:
    """Qwen3-Next's fused projections (in_proj_qkvz, in_proj_ba: rows grouped per key head as
    [q k v z] and [b a]) -> the split form of Qwen3.5 (in_proj_qkv, in_proj_z, in_proj_b,
    in_proj_a). A row permutation, done once at load: both families then run the same code."""
    nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    r, H = nv // nk, c.hidden_size
    qkvz = w.pop(p + "in_proj_qkvz.weight").view(nk, 2 * dk + 2 * r * dv, H)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=1)
    w[p + "in_proj_qkv.weight"] = torch.cat([t.reshape(-1, H) for t in (q, k, v)])
    w[p + "in_proj_z.weight"] = z.reshape(-1, H).contiguous()
    b, a = w.pop(p + "in_proj_ba.weight").view(nk, 2 * r, H).split([r, r], dim=1)
    w[p + "in_proj_b.weight"], w[p + "in_proj_a.weight"] = b.reshape(-1, H).contiguous(), a.reshape(-1, H).contiguous()


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent(q, k, v, g, beta, S):
    """Token by token. q, k [H, T, dk], v [H, T, dv], g, beta [H, T], S [H, dk, dv] (updated in place)."""
    out = torch.empty_like(v)
    s = S
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[:, None, None]
        kv_mem = (s * k[:, t, :, None]).sum(-2)
        delta = (v[:, t] - kv_mem) * beta[:, t, None]
        s = s + k[:, t, :, None] * delta[:, None, :]
        out[:, t] = (s * q[:, t, :, None]).sum(-2)
    S.copy_(s)
    return out


def chunked(q, k, v, g, beta, S, C: int = CHUNK):
    """The same recurrence, C tokens at a time (same arguments as `recurrent`)."""
    H, T, _ = q.shape
    pad = (-T) % C
    if pad:  # padded steps: k = v = 0, beta = 0, g = 0 -> they change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(H, n, C, -1) for x in (q, k, v))
    g, beta = g.reshape(H, n, C), beta.reshape(H, n, C, 1)
    k_beta, v_beta = k * beta, v * beta
    gc = g.cumsum(-1)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()
    # (I + strictly-lower(k_beta k^T decay)) u = v_beta: the delta rule's updates within a chunk
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    kc = torch.linalg.solve_triangular(system, k_beta * gc.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_dec = q * gc.exp()[..., None]
    k_dec = k * (gc[..., -1:] - gc).exp()[..., None]
    chunk_decay = gc[..., -1].exp()[..., None, None]
    out = torch.empty_like(v)
    s = S
    for i in range(n):
        v_new = u[:, i] - kc[:, i] @ s
        out[:, i] = q_dec[:, i] @ s + intra[:, i] @ v_new
        s = s * chunk_decay[:, i] + k_dec[:, i].transpose(-1, -2) @ v_new
    S.copy_(s)
    return out.reshape(H, n * C, -1)[:, :T]


def gated_deltanet(x: torch.Tensor, w: dict, p: str, c, conv_state: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """One DeltaNet layer on the normalised hidden states x [T, hidden] (p: its weight prefix,
    e.g. 'layers.0.linear.'); conv_state [conv_dim, K-1] and S are updated in place."""
    T = x.shape[0]
    nk, nv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    qkv = linear(x, w[p + "in_proj_qkv.weight"])
    z = linear(x, w[p + "in_proj_z.weight"]).view(T, nv, dv)
    b, a = linear(x, w[p + "in_proj_b.weight"]), linear(x, w[p + "in_proj_a.weight"])
    # causal depthwise conv over [last K-1 inputs, this chunk]
    xs = torch.cat([conv_state, qkv.t().to(conv_state.dtype)], dim=1)
    conv_state.copy_(xs[:, xs.shape[1] - conv_state.shape[1]:])
    wc = w[p + "conv1d.weight"]
    y = F.silu(F.conv1d(xs[None].to(wc.dtype), wc.view(wc.shape[0], 1, -1), groups=wc.shape[0])[0]).t().to(x.dtype)
    q, k, v = y.split([nk * dk, nk * dk, nv * dv], dim=-1)
    q, k, v = q.reshape(T, nk, dk), k.reshape(T, nk, dk), v.reshape(T, nv, dv)
    if nv != nk:  # each key head serves nv/nk consecutive value heads
        q, k = q.repeat_interleave(nv // nk, dim=1), k.repeat_interleave(nv // nk, dim=1)
    q, k, v = (t.transpose(0, 1).float() for t in (q, k, v))
    q, k = l2norm(q) * dk ** -0.5, l2norm(k)
    beta = torch.sigmoid(b).float().t()
    g = (-w[p + "A_log"].float().exp() * F.softplus(a.float() + w[p + "dt_bias"].float())).t()
    o = (recurrent if T == 1 else chunked)(q, k, v, g, beta, S)
    o = o.transpose(0, 1).to(x.dtype)  # [T, nv, dv]
    # RMSNorm per head, gated by SiLU(z)
    of = o.float()
    o = w[p + "norm.weight"] * (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(x.dtype)
    o = (o * F.silu(z.float())).to(x.dtype)
    return linear(o.reshape(T, nv * dv), w[p + "out_proj.weight"])
