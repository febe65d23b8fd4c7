"""The pieces of one decode token (runtime/graph_decode.py) as pure functions of tensors, so that
on CUDA torch.compile fuses each into a few kernels: a captured step then holds ~16 kernels per
MoE layer instead of ~60, and at a few microseconds per kernel that is most of a token's time.
Everything a layer needs comes in as arguments (weights, cache, position), never from `self`, so
one compiled function serves every layer. On CPU they run as written (the CI twin).

Written for inductor's fusion: the router, the attention scores and the top-k are sums and maxima
(reduction kernels that take their neighbours' elementwise work in), not cuBLAS GEMVs, a matmul
and torch.topk's sort + gather; RoPE has no cat. Per Mixtral layer on the H200 that took the
routing from 19.8 to 7.1 us of device time (benchmarks/results/h200-s9-decode-ops-8l.json).

    h2 = attention(h, delta, hs_row, ...)   # h + delta (the previous layer's FFN output), saved to
                                           # hs_row (on CUDA with a packed q/k/v inside the q/k/v
                                           # GEMV, with the norm: kernels/decode_fuse.py), then
                                           # attention: on CUDA one kernel for RoPE,
                                           # the K/V writes and positions 0..pos
                                           # (kernels/decode_attention.py), else over the whole
                                           # masked cache in torch (the CPU twin)
    x, ids, w = route(h2, ...)             # norm, router, softmax/top-k on the device
    addrs = addresses(...)                 # the routed experts' record addresses (slot table)
    missing(present, ids, out)             # per layer, its routed experts the table lacked
    h2, x, ids, w, addrs = moe_layer(...)  # the three in one compiled function (MoE layers); on
                                           # CUDA the add after attention, route and addresses
                                           # in one kernel (kernels/decode_fuse.py)
"""
from __future__ import annotations

import torch

from ..kernels import decode_attention as fused_attention
from ..kernels import decode_fuse as fuse
from ..models.layers import linear, rms_norm


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def attention(h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
              heads: int, kv_heads: int, head_dim: int, eps: float, qk_norm: str, clip, window, scale: float,
              fold: int = 3):
    """The residual h + delta (kept in hs_row), then one token's attention block added to it."""
    h, o = attention_parts(h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
                           heads, kv_heads, head_dim, eps, qk_norm, clip, window, scale, fold)
    return h + o


def attention_parts(h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
                    heads: int, kv_heads: int, head_dim: int, eps: float, qk_norm: str, clip, window, scale: float,
                    fold: int = 3):
    """(h + delta, the attention block's output o), h + delta also kept in hs_row. On CUDA with a
    packed q/k/v (and the NORM bit of `fold`) the add and the norm run inside the q/k/v GEMV
    (kernels/decode_fuse.py)."""
    if fold & fuse.NORM and fuse.takes_norm_qkv(h, delta, norm_w, wqkv):
        qkv = fuse.norm_qkv(h, delta, hs_row, norm_w, wqkv, eps)
        if bqkv is not None:
            qkv = qkv + bqkv
        h = hs_row
    else:
        h = h + delta
        hs_row.copy_(h)
        x = rms_norm(h, norm_w, eps)
        qkv = linear(x, wqkv, bqkv)
    nq, nk = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    if qk_norm == "full":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim), v.view(1, kv_heads, head_dim)
    if qk_norm == "head":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if fused_attention.takes(K, heads, q.dtype):  # CUDA: RoPE, the K/V writes and attention over 0..pos in one kernel
        out = fused_attention.decode_attention(q.reshape(1, nq), k.reshape(1, nk), v.reshape(1, nk), cos, sin, K, V,
                                               pos, window or 0, scale)
    else:
        out = attend(q, k, v, cos, sin, K, V, pos, kpos, window, scale)
    return h, linear(out, wo)


def attend(q, k, v, cos, sin, K, V, pos, kpos, window, scale: float):
    """RoPE of q [1, heads, D] and k [1, kv_heads, D], k and v written to K/V [n_ctx, kv_heads, D]
    at pos, then attention over the whole cache under the position mask: [1, heads * D]. The
    torch formula of the fused kernel (kernels/decode_attention.py): its CPU twin and fallback."""
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    K.index_copy_(0, pos, k)
    V.index_copy_(0, pos, v)
    mask = kpos <= pos
    if window:
        mask = mask & (pos - kpos < window)
    g = heads // kv_heads
    # the scores [kv_heads, g, n_ctx] as a sum of products, one reduction kernel (2.3 us per layer
    # on the H200, cuBLAS's product 2.9); p @ V stays a cuBLAS product: as a reduction over the
    # cache's rows inductor read V across rows, 13 us against cuBLAS's 3.4 (h200-s9-*.json)
    s = _dot(q.view(kv_heads, g, 1, head_dim), K.permute(1, 0, 2)[:, None], -1).to(q.dtype).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    out = torch.matmul(p, V.permute(1, 0, 2))  # [kv_heads, g, d]: head order as the query's
    return out.reshape(1, heads * head_dim)


def _rotate_half(x):
    """models.layers.rotate_half (cat(-b, a) of the halves a, b) as a flip of the halves and a
    sign, the same values: inductor keeps it inside the kernel that reads it, where a cat of
    slices can become copy kernels of its own."""
    r = x.unflatten(-1, (2, -1)).flip(-2)  # [..., (b, a), d/2]
    first = torch.arange(2, device=x.device)[:, None] == 0
    return torch.where(first, -r, r).flatten(-2)


def _dot(a, b, dim: int):
    """sum(a * b) over `dim` in fp32 (as a matmul of a bf16 GEMM accumulates), broadcasting."""
    return (a.float() * b.float()).sum(dim)


def route(h, norm_w, router_w, ids_row, top_k: int, norm_topk: bool, eps: float):
    """The FFN input x and the routing of one token on the device: ids [1, k] (also written to
    ids_row for the host to read after the step) and weights [1, k] (as Decoder.route)."""
    x = rms_norm(h, norm_w, eps)
    # the router [E, H] as one reduction kernel (cuBLAS took a split-K GEMV and its reduce), its
    # logits rounded to x's dtype as F.linear's are
    if isinstance(router_w, torch.Tensor):
        logits = _dot(x[:, None, :], router_w, -1).to(x.dtype)
    else:
        logits = linear(x, router_w)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = top_k_of(probs, top_k, normalize=norm_topk, dtype=x.dtype)
    ids_row.copy_(ids[0])
    return x, ids, weights


def top_k_of(p, k: int, normalize: bool = False, dtype=None):
    """torch.topk(p, k) over [1, E] for a few k, the values divided by their sum if `normalize`:
    k rounds of max and masking, which inductor fuses with the softmax and the division into one
    kernel (torch.topk is a sort and a gather, and the sum over [1, k] one more kernel). Ties go to
    the lower expert id; values in descending order, as torch.topk returns them, in `dtype` if
    given (converted before they are joined: the join then stays in the same kernel)."""
    e = torch.arange(p.shape[-1], device=p.device)
    vals, ids = [], []
    for _ in range(k):
        v, i = p.max(dim=-1, keepdim=True)  # the first index of the maximum
        vals.append(v)
        ids.append(i)
        p = p.masked_fill(e == i, float("-inf"))
    if normalize:  # the sum as scalar adds in rank order, where a [1, k] sum would be a kernel of its own
        total = vals[0]
        for v in vals[1:]:
            total = total + v
        vals = [v / total for v in vals]
    if dtype is not None:
        vals = [v.to(dtype) for v in vals]
    return torch.cat(vals, dim=-1), torch.cat(ids, dim=-1)


def addresses(entries_row, ids, base, stride: int):
    """Record addresses of the routed experts: base + slot * stride, slots from the table row."""
    return base + entries_row.index_select(0, ids[0]) * stride


def moe_layer(h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
              ffn_norm, router_w, ids_row, entries_row, base, heads: int, kv_heads: int, head_dim: int, eps: float,
              qk_norm: str, clip, window, scale: float, top_k: int, norm_topk: bool, stride: int, fold: int = 3):
    """attention, route and addresses of one MoE layer in one function (fused across their
    boundaries: the residual add, the FFN norm and the router share kernels; on CUDA, with the
    ROUTE bit of `fold`, one kernel: kernels/decode_fuse.py)."""
    h, o = attention_parts(h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
                           heads, kv_heads, head_dim, eps, qk_norm, clip, window, scale, fold)
    if fold & fuse.ROUTE and fuse.takes_route(h, ffn_norm, router_w, top_k):
        return fuse.route(h, o, ffn_norm, router_w, ids_row, entries_row, base, stride, eps, top_k, norm_topk)
    h = h + o
    x, ids, weights = route(h, ffn_norm, router_w, ids_row, top_k, norm_topk, eps)
    return h, x, ids, weights, addresses(entries_row, ids, base, stride)


def missing(present, ids, out):
    """Per MoE layer, how many of its routed experts (ids [layers, k]) the slot table did not
    hold when the step looked them up (present [layers, E]: 1 = resident), into out [layers]."""
    out.copy_((present.gather(1, ids) == 0).sum(1))


def head(h, delta, norm_w, lm_head, logits_out, eps: float):
    h = h + delta
    logits_out.copy_(linear(rms_norm(h, norm_w, eps), lm_head).float())


class Ops:
    """The functions above, compiled with torch.compile on CUDA (one compilation serves every
    layer); as written elsewhere, or where compilation fails (then `note` says why)."""
    NAMES = ("rope_tables", "attention", "moe_layer", "missing", "head")
    _shared: dict = {}

    @classmethod
    def get(cls, compile: bool) -> "Ops":
        """One instance per process and kind: every engine runs the same compiled code."""
        if compile not in cls._shared:
            cls._shared[compile] = cls(compile)
        return cls._shared[compile]

    def __init__(self, compile: bool):
        self.compiled, self.note = False, "not compiled (CPU)" if not compile else ""
        fns = {n: globals()[n] for n in self.NAMES}
        if compile:
            try:
                import torch._dynamo.config as dc
                for key in ("recompile_limit", "cache_size_limit"):  # one compilation per model shape
                    if hasattr(dc, key):
                        setattr(dc, key, max(getattr(dc, key), 64))
                import torch._inductor.config as ic
                # round every intermediate to its dtype as eager code does: a step resumed from a
                # saved bf16 residual (after a miss) must see the values the fused kernel saw
                if hasattr(ic, "emulate_precision_casts"):
                    ic.emulate_precision_casts = True
                # fuse kernels that share only a few bytes (the K and V writes share the position):
                # a decode step's kernels are launch-bound, one launch fewer is worth more than
                # the memory a fusion saves (default: fuse only past 10 bytes shared)
                if hasattr(ic, "score_fusion_memory_threshold"):
                    ic.score_fusion_memory_threshold = 1
                # compile in this process: the decode step's few kernels compile before its pool of
                # compile workers is warm, and that pool then took a core for ~10 s more, into
                # the first decode tokens, where the C kernels of n_cpu_moe layers want all 16
                # (H200, benchmarks/README.md, h11)
                if hasattr(ic, "compile_threads"):
                    ic.compile_threads = 1
                fns = {n: torch.compile(f, dynamic=False, fullgraph=True) for n, f in fns.items()}
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - no compiler here: run as written
                self.note = f"torch.compile unavailable ({type(e).__name__}: {e})"
        self._plain = {n: globals()[n] for n in self.NAMES}
        for n, f in fns.items():
            setattr(self, n, f)

    def uncompile(self, why: str):
        """Fall back to the functions as written (a compilation failed on first use)."""
        self.compiled, self.note = False, why
        for n, f in self._plain.items():
            setattr(self, n, f)
