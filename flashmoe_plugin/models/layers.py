"""The shared decoder: embeddings, RMSNorm, RoPE attention with a preallocated KV cache, the
router, and the dense/shared MLPs. Routed experts are not computed here: the decoder calls
`experts(layer, x, ids, weights, h)` (h: the residual state, for look-ahead), which the engine
serves from the pager (models never do I/O and never know tiers)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import mla
from .base import ModelConfig
from .rope import frequencies

# Not cuDNN: it builds an execution plan per key length, ~15 ms of host time for every decode
# step on an H200 (measured with torch.profiler: 85% of a decode token's CPU time).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). w is a float tensor, or a weight kept packed (kernels/packed.py: q8/q4 or a
    GGUF's own blocks, `dense_quant`), which computes the product with the kernel backend."""
    return F.linear(x, w, b) if isinstance(w, torch.Tensor) else w.linear(x, b)


def embed(tokens: torch.Tensor, w) -> torch.Tensor:
    """Embedding rows of tokens; a packed embedding dequantizes only those rows."""
    return F.embedding(tokens, w) if isinstance(w, torch.Tensor) else w.rows(tokens)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w as ggml computes it, bit for bit: fp32 squares summed in
    fp64, the mean rounded to fp32, a correctly rounded sqrt (torch's fp32 sqrt on the CPU is a
    SIMD approximation, one ulp off in ~10% of rows), 1/that, x * scale, then * w. llama.cpp
    quantizes a norm's output to 8 bits for the next matmul, so a one-ulp difference here flips
    a rounding there, and through attention every later position (issue 11: Q4_0's agreement).
    Metal has no fp64: there the sums and the sqrt stay in fp32."""
    xf = x.float()
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    mean = ((xf * xf).sum(-1, keepdim=True, dtype=acc) / x.shape[-1]).float()
    scale = 1.0 / torch.sqrt((mean + eps).to(acc)).float()
    return (xf * scale).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def swiglu_clamped(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation on [T, 2I] (gate half, then up half): both clamped, a sigmoid
    of slope alpha, and (up + 1) as the linear factor."""
    gate, up = h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_activation(c: ModelConfig):
    """None for the plain SwiGLU the fused kernels compute, else the activation [T, 2I] -> [T, I]."""
    if c.expert_act == "swiglu_clamped":
        return lambda h: swiglu_clamped(h, c.swiglu_alpha, c.swiglu_limit)
    if c.expert_act == "geglu":  # Grok-1: gelu (tanh form) of the gate times the up projection
        return lambda h: (lambda gate, up: F.gelu(gate, approximate="tanh") * up)(*h.chunk(2, dim=-1))
    if c.expert_act != "swiglu":
        raise ValueError(f"unknown expert activation {c.expert_act!r}")
    return None


def required_names(c: ModelConfig) -> list[str]:
    """Canonical names of every dense tensor the decoder needs."""
    if c.layer_types:
        from .hybrid import required_names as hybrid_names
        return hybrid_names(c)
    names = ["embed.weight", "norm.weight"] + ([] if c.tie_word_embeddings else ["lm_head.weight"])
    for i in range(c.num_layers):
        p = f"layers.{i}."
        names += [p + "attn_norm.weight", p + "ffn_norm.weight"]
        names += [p + "attn_post_norm.weight", p + "ffn_post_norm.weight"] if c.sandwich_norms else []
        names += mla.dense_names(c, p) if c.attention == "mla" else [p + f"attn.{n}.weight" for n in "qkvo"]
        names += [p + "attn.o.bias"] if c.o_bias else []
        names += [p + "attn.sinks"] if c.attn_sinks else []
        if c.qkv_bias:
            names += [p + f"attn.{n}.bias" for n in "qkv"]
        if c.qk_norm != "none":
            names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
        if i in c.moe_layers:
            names.append(p + "moe.router.weight")
            if c.router == "sigmoid_group":
                names.append(p + "moe.router.score_bias")
            if c.router_bias:
                names.append(p + "moe.router.bias")
            if c.shared_expert_intermediate_size:
                names += [p + f"moe.shared.{n}.weight" for n in ("gate", "up", "down")]
            if c.shared_expert_gate:
                names.append(p + "moe.shared_gate.weight")
        else:
            names += [p + f"mlp.{n}.weight" for n in ("gate", "up", "down")]
    return names


def cache_dims(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-position, per-layer shapes of the two cached tensors (K and V; MLA: latent, rotary key)."""
    if cfg.attention == "mla":
        return mla.cache_dims(cfg)
    return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """What one more position of context costs in the cache, all layers together."""
    k, v = cache_dims(cfg)
    return cfg.num_layers * (math.prod(k) + math.prod(v)) * dtype.itemsize


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype: torch.dtype, device):
        kd, vd = cache_dims(cfg)
        self.k = torch.zeros((cfg.num_layers, n_ctx, *kd), dtype=dtype, device=device)
        self.v = torch.zeros((cfg.num_layers, n_ctx, *vd), dtype=dtype, device=device)
        self.n_ctx = n_ctx

    def rewind(self, n: int) -> int:
        return n  # K/V slots past n are simply overwritten

    def save(self, n: int) -> dict:
        return {"k": self.k[:, :n].clone(), "v": self.v[:, :n].clone()}

    def load(self, state: dict, n: int):
        self.k[:, :n].copy_(state["k"])
        self.v[:, :n].copy_(state["v"])


def decoder_for(cfg: ModelConfig):
    """The decoder class of a config: hybrid stacks (DeltaNet + attention layers) have their own."""
    if cfg.layer_types:
        from .hybrid import HybridDecoder
        return HybridDecoder
    return Decoder


class Decoder:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights
        missing = [n for n in required_names(cfg) if n not in weights]
        if missing:
            raise KeyError(f"dense weights lack {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.inv_freq, self.rope_factor = frequencies(cfg, weights["embed.weight"].device)
        self.lm_head = weights["embed.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.moe_layers = set(cfg.moe_layers)
        self.windowed = set(range(cfg.num_layers) if cfg.sliding_layers is None else cfg.sliding_layers) \
            if cfg.sliding_window else set()
        self.expert_act = expert_activation(cfg)
        self.numerics = None  # kernels/ggml_numerics.py for a GGUF on the CPU (set by the engine)

    def _ggml(self, dtype: torch.dtype, device):
        """llama.cpp's float order for ops on such tensors, when the engine gave one and it applies."""
        n = self.numerics
        return n if n is not None and n.active(dtype, device) else None

    def new_cache(self, n_ctx: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(self.cfg, n_ctx, dtype, device)

    # ------------------------------------------------------------------ attention
    def positions(self, start: int, T: int, dtype: torch.dtype, device) -> tuple:
        """What every layer's attention shares for tokens start..start+T-1, computed once per
        forward: RoPE's cos and sin, the causal mask (None for one token) and the sliding-window
        mask (None without a window)."""
        c = self.cfg
        pos = torch.arange(start, start + T, device=device)
        g = self._ggml(dtype, device) if not c.rope_scaling else None
        if g is not None:
            cos, sin = g.rope_tables(start, T, 2 * len(self.inv_freq), c.rope_theta)
        else:
            freqs = torch.outer(pos.float(), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.rope_factor, emb.sin() * self.rope_factor
            cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]
        causal = window = None
        if T > 1 or c.sliding_window:
            kpos = torch.arange(start + T, device=device)
            causal = kpos[None, :] <= pos[:, None]
            if c.sliding_window:
                window = causal & (pos[:, None] - kpos[None, :] < c.sliding_window)
        return cos, sin, causal if T > 1 else None, window

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    def qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """Layer i's queries [T, heads, d] and keys, values [T, kv_heads, d]: projected,
        normalised, clipped and rotated."""
        c, w, p = self.cfg, self.w, f"layers.{i}.attn."
        T = x.shape[0]
        q = linear(x, w[p + "q.weight"], w.get(p + "q.bias"))
        k = linear(x, w[p + "k.weight"], w.get(p + "k.bias"))
        v = linear(x, w[p + "v.weight"], w.get(p + "v.bias"))
        if c.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm.weight"], c.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(T, c.num_heads, c.head_dim)
        k = k.view(T, c.num_kv_heads, c.head_dim)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = rms_norm(q, w[p + "q_norm.weight"], c.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], c.rms_norm_eps)
        rope = self.rope if self._ggml(x.dtype, x.device) is None or c.rope_scaling else self.numerics.rope
        return rope(q, cos, sin), rope(k, cos, sin), v

    def attention(self, i: int, x: torch.Tensor, start: int, kv: KVCache, at: tuple) -> torch.Tensor:
        c, w, p = self.cfg, self.w, f"layers.{i}.attn."
        if c.attention == "mla":
            return mla.attention(self, i, x, start, kv, at)
        T = x.shape[0]
        cos, sin, causal, window = at
        mask = window if i in self.windowed else causal
        q, k, v = self.qkv(i, x, cos, sin)
        kv.k[i, start:start + T] = k
        kv.v[i, start:start + T] = v
        keys, vals = kv.k[i, :start + T], kv.v[i, :start + T]
        if c.attn_sinks:
            keys, vals, mask = self.sink(w[p + "sinks"], keys, vals, mask, T)
        g = self._ggml(x.dtype, x.device) if not c.attn_sinks and i not in self.windowed else None
        if g is not None and not c.attn_softcap:  # [T, H * d] -> [H, T, d] as SDPA's below
            scale = c.attn_scale if c.attn_scale is not None else g.scale(c.head_dim)
            out = g.attention(q, keys, vals, start, scale).view(T, c.num_heads, -1).transpose(0, 1)
        elif c.attn_softcap:
            out = self.softcapped(q, keys, vals, mask)
        else:
            # a GPU prompt from position 0 whose mask is plain causal: is_causal, no mask, so SDPA
            # can take flash attention (GQA included). With a mask and GQA it fell back to its
            # fp32 math path: 9 ms of device time per 512-token Mixtral prompt on an H200 (issue 9,
            # benchmarks/results/h200-p9b-prefill-32l.json).
            causal_only = x.is_cuda and T > 1 and start == 0 and not c.attn_sinks and \
                (i not in self.windowed or T <= c.sliding_window)
            with sdpa_kernel(SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None],
                    attn_mask=None if causal_only else mask, is_causal=causal_only,
                    enable_gqa=c.num_heads != c.num_kv_heads, scale=c.attn_scale)[0]
        out = linear(out.transpose(0, 1).reshape(T, -1), w[p + "o.weight"], w.get(p + "o.bias"))
        if c.sandwich_norms:
            out = rms_norm(out, w[f"layers.{i}.attn_post_norm.weight"], c.rms_norm_eps)
        return out

    def softcapped(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask) -> torch.Tensor:
        """Attention whose scores are soft-capped before the softmax (Grok-1: cap * tanh(s / cap));
        SDPA has no such step. Returns [heads, T, head_dim] like SDPA's output."""
        c = self.cfg
        rep = c.num_heads // c.num_kv_heads
        k, v = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
        scale = c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5
        s = torch.einsum("thd,shd->hts", q, k).float() * scale
        s = c.attn_softcap * torch.tanh(s / c.attn_softcap)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.einsum("hts,shd->htd", torch.softmax(s, dim=-1).to(v.dtype), v)

    @staticmethod
    def sink(sinks: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask, T: int) -> tuple:
        """Attention sinks as one more key: zero key and value, and the head's sink logit as its
        additive mask, so each softmax's denominator gains exp(sink) and nothing is added to the
        output."""
        zero = keys.new_zeros((1, *keys.shape[1:]))
        keys, vals = torch.cat((keys, zero)), torch.cat((vals, zero))
        S, H = keys.shape[0], sinks.shape[0]
        bias = torch.zeros((1, H, T, S), dtype=keys.dtype, device=keys.device)
        if mask is not None:
            bias[..., :-1].masked_fill_(~mask, float("-inf"))
        bias[..., -1] = sinks.to(keys.dtype)[:, None]
        return keys, vals, bias

    # ------------------------------------------------------------------ feed-forward
    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] for layer i."""
        c = self.cfg
        w, b, g = self.w[f"layers.{i}.moe.router.weight"], self.w.get(f"layers.{i}.moe.router.bias"), self._ggml(x.dtype, x.device)
        if g is not None and b is None and isinstance(w, torch.Tensor):
            logits = g.matmul(x, w)
        else:
            logits = linear(x, w, b).float()
        if c.router == "sigmoid_group":
            return self._route_sigmoid_group(i, logits, x.dtype)
        if c.router == "topk_softmax":  # gpt-oss: the softmax runs over the k chosen logits only
            top, ids = torch.topk(logits, c.top_k, dim=-1)
            return ids, torch.softmax(top, dim=-1).to(x.dtype)
        probs = torch.softmax(logits, dim=-1) if g is None else g.softmax(logits)
        weights, ids = torch.topk(probs, c.top_k, dim=-1)
        if c.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def _route_sigmoid_group(self, i: int, logits: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3: sigmoid scores; the score bias steers the choice only; experts come from
        the topk_group groups whose two best biased scores sum highest."""
        c = self.cfg
        scores = logits.sigmoid()
        choice = scores + self.w[f"layers.{i}.moe.router.score_bias"].float()
        if c.n_group > 1:
            grouped = choice.view(-1, c.n_group, c.num_experts // c.n_group)
            best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(c.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        ids = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, (weights * c.routed_scaling_factor).to(dtype)

    def guess(self, j: int, h: torch.Tensor) -> list[int]:
        """Layer j's top-k experts for the residual state h of one token, as if h reached layer j
        unchanged: the prefetch predictor's look-ahead (cheap: one norm and one router matvec)."""
        ids, _ = self.route(j, rms_norm(h, self.w[f"layers.{j}.ffn_norm.weight"], self.cfg.rms_norm_eps))
        return ids[0].tolist()

    def guess_many(self, js, h: torch.Tensor) -> list[list[int]]:
        """guess() for several layers at once, ~5x cheaper (the look-ahead runs every layer, up to
        8 layers deep): the norm's scale once, one router matvec per layer, one top-k and one
        read-back. A guess only ranks logits, so ggml's exact norm and the softmax (it keeps the
        order) are skipped; DeepSeek's grouped router goes through guess()."""
        return self.guess_scored(js, h)[0]

    def guess_scored(self, js, h: torch.Tensor) -> tuple[list[list[int]], list[list[float] | None]]:
        """guess_many's guesses and, per guessed expert, its margin: its router logit less the
        best logit left out (the (top_k+1)-th), a guess's confidence (the predictor grades cold
        guesses by it: on the synth Mixtral store, margins under 0.5 were right 29% of the time,
        over 2 83%). Margins are None for DeepSeek's grouped router."""
        c = self.cfg
        if c.router == "sigmoid_group" or not js:
            return [self.guess(j, h) for j in js], [None] * len(js)
        hf = h[-1].float()
        n = hf * torch.rsqrt(hf.square().mean() + c.rms_norm_eps)
        rows = []
        for j in js:
            w, b = self._guess_router(j), self.w.get(f"layers.{j}.moe.router.bias")
            x = n * self.w[f"layers.{j}.ffn_norm.weight"].float()
            if isinstance(w, torch.Tensor):
                row = torch.mv(w, x.to(w.dtype)).float()
                rows.append(row if b is None else row + b.float())
            else:
                rows.append(linear(x[None].to(h.dtype), w, b).float()[0])
        k = c.top_k
        vals, ids = torch.stack(rows).topk(min(k + 1, c.num_experts), dim=-1)
        margins = (vals[:, :k] - vals[:, k:]).tolist() if vals.shape[1] > k else [[math.inf] * k] * len(js)
        return ids[:, :k].tolist(), margins

    def _guess_router(self, j: int):
        """Layer j's router for guesses: an fp32 copy while all the copies stay under 16 MiB (a
        bf16 matvec on the CPU is 3x slower than converting and multiplying; Mixtral's 32 routers
        take 4 MiB), else the router as held."""
        cache = self.__dict__.setdefault("_routers_f32", {})
        w = cache.get(j)
        if w is None:
            w = self.w[f"layers.{j}.moe.router.weight"]
            if isinstance(w, torch.Tensor) and w.dtype != torch.float32 and \
                    sum(t.numel() for t in cache.values()) + w.numel() <= 4 << 20:
                w = cache[j] = w.float()
        return w

    def ffn(self, i: int, h: torch.Tensor, experts) -> torch.Tensor:
        """The feed-forward block of layer i on the residual state h (normalised here)."""
        w, p = self.w, f"layers.{i}."
        x = rms_norm(h, w[p + "ffn_norm.weight"], self.cfg.rms_norm_eps)
        if i not in self.moe_layers:
            return swiglu(x, w[p + "mlp.gate.weight"], w[p + "mlp.up.weight"], w[p + "mlp.down.weight"])
        ids, weights = self.route(i, x)
        out = experts(i, x, ids, weights, h)
        if self.cfg.shared_expert_intermediate_size:
            out = out + self.shared(i, x)
        if self.cfg.sandwich_norms:
            out = rms_norm(out, w[p + "ffn_post_norm.weight"], self.cfg.rms_norm_eps)
        return out

    def shared(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's shared (always-on) expert on the normalised x, gated where the family gates it."""
        w, p = self.w, f"layers.{i}.moe."
        s = swiglu(x, w[p + "shared.gate.weight"], w[p + "shared.up.weight"], w[p + "shared.down.weight"])
        if self.cfg.shared_expert_gate:
            s = torch.sigmoid(linear(x, w[p + "shared_gate.weight"])) * s
        return s

    # ------------------------------------------------------------------ whole model
    def forward(self, tokens: torch.Tensor, start: int, kv: KVCache, experts, last_only: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """Logits, or with hidden=True the final normalised hidden states (llama.cpp's embeddings)."""
        c, w = self.cfg, self.w
        x = embed(tokens, w["embed.weight"])
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        at = self.positions(start, x.shape[0], x.dtype, x.device)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            x = x + self.attention(i, rms_norm(x, w[p + "attn_norm.weight"], c.rms_norm_eps), start, kv, at)
            x = x + self.ffn(i, x, experts)
        if last_only:
            x = x[-1:]
        x = rms_norm(x, w["norm.weight"], c.rms_norm_eps)
        if hidden:
            return x.float()
        logits = linear(x, self.lm_head).float()
        return logits * c.logit_scale if c.logit_scale != 1.0 else logits
