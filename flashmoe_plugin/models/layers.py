"""The shared decoder: embeddings, RMSNorm, RoPE attention with a preallocated KV cache, the
router, and the dense/shared MLPs. Routed experts are not computed here: the decoder calls
`experts(layer, x, ids, weights, h)` (h: the residual state, for look-ahead), which the engine
serves from the pager (models never do I/O and never know tiers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import ModelConfig

# Not cuDNN: it builds an execution plan per key length, ~15 ms of host time for every decode
# step on an H200 (measured with torch.profiler: 85% of a decode token's CPU time).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def required_names(c: ModelConfig) -> list[str]:
    """Canonical names of every dense tensor the decoder needs."""
    names = ["embed.weight", "norm.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
    for i in range(c.num_layers):
        p = f"layers.{i}."
        names += [p + "attn_norm.weight", p + "ffn_norm.weight"] + [p + f"attn.{n}.weight" for n in "qkvo"]
        if c.qkv_bias:
            names += [p + f"attn.{n}.bias" for n in "qkv"]
        if c.qk_norm != "none":
            names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
        if i in c.moe_layers:
            names.append(p + "moe.router.weight")
            if c.shared_expert_intermediate_size:
                names += [p + f"moe.shared.{n}.weight" for n in ("gate", "up", "down")]
            if c.shared_expert_gate:
                names.append(p + "moe.shared_gate.weight")
        else:
            names += [p + f"mlp.{n}.weight" for n in ("gate", "up", "down")]
    return names


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, n_ctx, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_ctx = n_ctx


class Decoder:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights
        missing = [n for n in required_names(cfg) if n not in weights]
        if missing:
            raise KeyError(f"dense weights lack {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        dev = weights["embed.weight"].device
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=dev).float() / hd))
        self.lm_head = weights["embed.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.moe_layers = set(cfg.moe_layers)

    # ------------------------------------------------------------------ attention
    def positions(self, start: int, T: int, dtype: torch.dtype, device) -> tuple:
        """What every layer's attention shares for tokens start..start+T-1, computed once per
        forward: RoPE's cos and sin, and the attention mask (None for one token, no window)."""
        c = self.cfg
        pos = torch.arange(start, start + T, device=device)
        freqs = torch.outer(pos.float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
        mask = None
        if T > 1 or c.sliding_window:
            kpos = torch.arange(start + T, device=device)
            mask = kpos[None, :] <= pos[:, None]
            if c.sliding_window:
                mask &= pos[:, None] - kpos[None, :] < c.sliding_window
        return cos, sin, mask

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    def attention(self, i: int, x: torch.Tensor, start: int, kv: KVCache, at: tuple) -> torch.Tensor:
        c, w, p = self.cfg, self.w, f"layers.{i}.attn."
        T = x.shape[0]
        q = F.linear(x, w[p + "q.weight"], w.get(p + "q.bias"))
        k = F.linear(x, w[p + "k.weight"], w.get(p + "k.bias"))
        v = F.linear(x, w[p + "v.weight"], w.get(p + "v.bias"))
        if c.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm.weight"], c.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(T, c.num_heads, c.head_dim)
        k = k.view(T, c.num_kv_heads, c.head_dim)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = rms_norm(q, w[p + "q_norm.weight"], c.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], c.rms_norm_eps)
        cos, sin, mask = at
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        kv.k[i, start:start + T] = k
        kv.v[i, start:start + T] = v
        keys, vals = kv.k[i, :start + T], kv.v[i, :start + T]
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None],
                attn_mask=mask, enable_gqa=c.num_heads != c.num_kv_heads)
        return F.linear(out[0].transpose(0, 1).reshape(T, -1), w[p + "o.weight"])

    # ------------------------------------------------------------------ feed-forward
    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] for layer i."""
        c = self.cfg
        probs = torch.softmax(F.linear(x, self.w[f"layers.{i}.moe.router.weight"]).float(), dim=-1)
        weights, ids = torch.topk(probs, c.top_k, dim=-1)
        if c.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def guess(self, j: int, h: torch.Tensor) -> list[int]:
        """Layer j's top-k experts for the residual state h of one token, as if h reached layer j
        unchanged: the prefetch predictor's look-ahead (cheap: one norm and one router matvec)."""
        ids, _ = self.route(j, rms_norm(h, self.w[f"layers.{j}.ffn_norm.weight"], self.cfg.rms_norm_eps))
        return ids[0].tolist()

    def ffn(self, i: int, h: torch.Tensor, experts) -> torch.Tensor:
        """The feed-forward block of layer i on the residual state h (normalised here)."""
        w, p = self.w, f"layers.{i}."
        x = rms_norm(h, w[p + "ffn_norm.weight"], self.cfg.rms_norm_eps)
        if i not in self.moe_layers:
            return swiglu(x, w[p + "mlp.gate.weight"], w[p + "mlp.up.weight"], w[p + "mlp.down.weight"])
        ids, weights = self.route(i, x)
        out = experts(i, x, ids, weights, h)
        if self.cfg.shared_expert_intermediate_size:
            s = swiglu(x, w[p + "moe.shared.gate.weight"], w[p + "moe.shared.up.weight"], w[p + "moe.shared.down.weight"])
            if self.cfg.shared_expert_gate:
                s = torch.sigmoid(F.linear(x, w[p + "moe.shared_gate.weight"])) * s
            out = out + s
        return out

    # ------------------------------------------------------------------ whole model
    def forward(self, tokens: torch.Tensor, start: int, kv: KVCache, experts, last_only: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """Logits, or with hidden=True the final normalised hidden states (llama.cpp's embeddings)."""
        c, w = self.cfg, self.w
        x = F.embedding(tokens, w["embed.weight"])
        at = self.positions(start, x.shape[0], x.dtype, x.device)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            x = x + self.attention(i, rms_norm(x, w[p + "attn_norm.weight"], c.rms_norm_eps), start, kv, at)
            x = x + self.ffn(i, x, experts)
        if last_only:
            x = x[-1:]
        x = rms_norm(x, w["norm.weight"], c.rms_norm_eps)
        return x.float() if hidden else F.linear(x, self.lm_head).float()
