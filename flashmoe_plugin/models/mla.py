"""Multi-head latent attention (DeepSeek-V2/V3), computed in its absorbed form.

The cache holds, per position, the normalised KV latent (kv_lora_rank values) and the rotary key
shared by all heads (head_dim values) — not per-head K and V. The up-projection kv_b is folded
into the query (q_nope · W_uk gives the query in latent space) and into the output (the
attention-weighted latent · W_uv), so no step ever expands the cache into full keys and values:
decode reads (kv_lora_rank + head_dim) values per cached position and layer."""
from __future__ import annotations

import torch

from .base import ModelConfig
from .rope import softmax_scale


def cache_dims(c: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-position shapes of the two cached tensors: (latent, rotary key)."""
    return (1, c.kv_lora_rank), (1, c.head_dim)


def dense_names(c: ModelConfig, p: str) -> list[str]:
    q = [p + "attn.q_a.weight", p + "attn.q_a_norm.weight", p + "attn.q_b.weight"] if c.q_lora_rank \
        else [p + "attn.q.weight"]
    return q + [p + f"attn.{n}.weight" for n in ("kv_a", "kv_a_norm", "kv_b", "o")]


def dense_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, n, dr = c.hidden_size, c.num_heads, c.head_dim
    qk = c.qk_nope_head_dim + dr
    return {"attn.q_a.weight": (c.q_lora_rank or 0, H), "attn.q_a_norm.weight": (c.q_lora_rank or 0,),
            "attn.q_b.weight": (n * qk, c.q_lora_rank or 0), "attn.q.weight": (n * qk, H),
            "attn.kv_a.weight": (c.kv_lora_rank + dr, H), "attn.kv_a_norm.weight": (c.kv_lora_rank,),
            "attn.kv_b.weight": (n * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "attn.o.weight": (H, n * c.v_head_dim)}


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary pairs (x0, x1), (x2, x3), ...; the result is laid out halves-first, as in
    transformers (q and k get the same layout, so their dot products are unchanged)."""
    cos, sin = cos[..., :cos.shape[-1] // 2], sin[..., :sin.shape[-1] // 2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def attention(dec, i: int, x: torch.Tensor, start: int, kv, at: tuple) -> torch.Tensor:
    from .layers import linear, rms_norm
    c, w, p = dec.cfg, dec.w, f"layers.{i}.attn."
    T, n, dn, dr, dv, r = x.shape[0], c.num_heads, c.qk_nope_head_dim, c.head_dim, c.v_head_dim, c.kv_lora_rank
    if c.q_lora_rank:
        q = linear(rms_norm(linear(x, w[p + "q_a.weight"], w.get(p + "q_a.bias")), w[p + "q_a_norm.weight"],
                              c.rms_norm_eps), w[p + "q_b.weight"])
    else:
        q = linear(x, w[p + "q.weight"])
    q_nope, q_rot = q.view(T, n, dn + dr).split([dn, dr], dim=-1)
    latent, k_rot = linear(x, w[p + "kv_a.weight"], w.get(p + "kv_a.bias")).split([r, dr], dim=-1)
    latent = rms_norm(latent, w[p + "kv_a_norm.weight"], c.rms_norm_eps)
    cos, sin, mask, _ = at  # MLA layers have no sliding window
    rot = rope_interleaved if c.rope_interleave else dec.rope
    q_rot, k_rot = rot(q_rot, cos, sin), rot(k_rot[:, None, :], cos, sin)[:, 0]
    kv.k[i, start:start + T, 0] = latent
    kv.v[i, start:start + T, 0] = k_rot
    lat, krot = kv.k[i, :start + T, 0], kv.v[i, :start + T, 0]          # [S, r], [S, dr]
    w_kv = w[p + "kv_b.weight"].view(n, dn + dv, r)
    q_lat = torch.einsum("thd,hdr->htr", q_nope, w_kv[:, :dn])           # the query in latent space
    scores = (q_lat @ lat.T + q_rot.transpose(0, 1) @ krot.T) * softmax_scale(c, dn + dr)  # [n, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
    out = torch.einsum("htr,hvr->thv", probs @ lat, w_kv[:, dn:])        # [T, n, dv]
    return linear(out.reshape(T, n * dv), w[p + "o.weight"], w.get(p + "o.bias"))
