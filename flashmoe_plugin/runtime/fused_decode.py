"""A decode layer's small steps fused into three kernels (csrc/cuda/fm_decode.cu), for the device
step (runtime/graph_decode.py). With the GEMVs and the expert kernel a MoE layer is then 6 launches:

    x   = add_norm(h, delta -> hs_row)     residual add + attention RMSNorm         (fused)
    qkv = linear(x, wqkv)                  the dense GEMV (cuBLAS or our q8/q4 kernel)
    a   = attend(qkv, ...)                 q/k norms, clip, RoPE, K/V write at pos, split-key GQA
                                           attention with an fp32 online softmax   (fused)
    o   = linear(a, wo)
    x, ids, w, addrs = route(hs_row, o)    residual add + FFN norm + router GEMV + softmax/top-k
                                           + the slot lookup of the routed records  (fused)
    delta = the fused MoE kernel on addrs

where decode_ops.py's compiled functions take ~20 kernels per layer. Each fused step has its
torch reference below (`*_ref`): the same computation as decode_ops.py, in the same order, so on
CPU (the twin CI runs) the fused structure gives decode_ops' results exactly; the CUDA kernels
round every intermediate the reference rounds and differ only in summation order (and in the
attention's softmax: fp32 probabilities where torch rounds them to the activation dtype).

Off by default: FLASHMOE_DECODE_FUSED=1 turns it on (on CUDA where the kernels are built; on CPU
the references). Its one measurement on the H200 (benchmarks/README.md, issue 9: 8 Mixtral layers,
q8 dense part) had it slower than decode_ops' compiled step, 594 against 718 tok/s, from the
attention kernel's serial split combine and the routing kernel's round trips; both were reworked
after that run and are not measured yet.
"""
from __future__ import annotations

import os

import torch

from ..kernels import decode_cuda
from ..models.layers import linear, rms_norm
from . import decode_ops


# ---------------------------------------------------------------- torch references (CPU twin)
def add_norm_ref(h, delta, h_out, w, eps):
    v = h + delta
    h_out.copy_(v)
    return rms_norm(v, w, eps)


def attend_ref(qkv, q_norm, k_norm, qk_norm, clip, cos, sin, K, V, pos, kpos, heads, kv_heads, head_dim, window,
               eps, scale):
    """decode_ops.attention between the QKV GEMV and the output projection: [1, heads * head_dim]."""
    nq, nk = heads * head_dim, kv_heads * head_dim
    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    if qk_norm == "full":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k, v = q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim), v.view(1, kv_heads, head_dim)
    if qk_norm == "head":
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    q = q * cos + decode_ops.rotate_half(q) * sin
    k = k * cos + decode_ops.rotate_half(k) * sin
    K.index_copy_(0, pos, k)
    V.index_copy_(0, pos, v)
    mask = kpos <= pos
    if window:
        mask = mask & (pos - kpos < window)
    g = heads // kv_heads
    s = torch.matmul(q.view(kv_heads, g, head_dim), K.permute(1, 2, 0)).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(p, V.permute(1, 0, 2)).reshape(1, nq)


def route_ref(h, o, h_out, norm_w, router_w, ids_row, entries_row, base, stride, top_k, norm_topk, eps):
    v = h + o
    h_out.copy_(v)
    x, ids, weights = decode_ops.route(v, norm_w, router_w, ids_row, top_k, norm_topk, eps)
    return x, ids[0], weights[0], decode_ops.addresses(entries_row, ids, base, stride)


# ---------------------------------------------------------------- the fused layer
def fused_mode(dev: torch.device) -> tuple[bool, str]:
    """(use the fused steps, why not) for a device step on `dev`."""
    env = os.environ.get("FLASHMOE_DECODE_FUSED", "")
    if env != "1":
        return False, "FLASHMOE_DECODE_FUSED=0" if env == "0" else \
            "off by default (measured slower than the compiled ops on the H200); FLASHMOE_DECODE_FUSED=1 turns it on"
    if dev.type != "cuda":
        return True, ""
    return decode_cuda.available()


def unfusable(engine) -> str:
    """Why this model's layers cannot take the fused kernels ('' when they can)."""
    c, w = engine.config, engine.model.w
    dt = engine.dtype
    if c.head_dim > 256 or c.head_dim % 2:
        return f"head_dim {c.head_dim} (the attention kernel takes even sizes up to 256)"
    if c.num_experts > 1024 or c.top_k > 32:
        return f"{c.num_experts} experts, top-{c.top_k} (the routing kernel takes up to 1024, top-32)"
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activation dtype {dt}"
    for name, t in w.items():
        if ("router" in name or "norm" in name) and (not isinstance(t, torch.Tensor) or t.dtype != dt):
            return f"{name} is not a {dt} tensor"
    if getattr(engine.model, "inv_freq", None) is None or engine.model.inv_freq.dtype != torch.float32:
        return "no fp32 RoPE frequencies"
    return ""


class FusedLayers:
    """moe_layer / attention with decode_ops' signatures (graph_decode's _body calls either), run
    by the CUDA kernels (`native`) or by the references above (the CPU twin)."""

    def __init__(self, engine, native: bool):
        c, dev = engine.config, engine.device
        self.native, self.inv_freq = native, engine.model.inv_freq
        if native:
            self.attn = decode_cuda.Attention(c.num_kv_heads, c.num_heads, c.head_dim, engine.n_ctx, dev)
            self.router = decode_cuda.Router(c.num_experts, dev)

    def _attention_out(self, h, delta, hs_row, norm_w, wqkv, bqkv, q_norm, k_norm, cos, sin, K, V, pos, kpos, wo,
                       heads, kv_heads, head_dim, eps, qk_norm, clip, window, scale, **_):
        """The attention block's output projection o; hs_row <- h + delta (the block's residual)."""
        if self.native:
            x = decode_cuda.add_norm(h, delta, hs_row, norm_w, eps)
            a = self.attn.run(linear(x, wqkv, bqkv), q_norm, k_norm, qk_norm, clip, self.inv_freq, pos, K, V, heads,
                              kv_heads, head_dim, window, eps, scale)
        else:
            x = add_norm_ref(h, delta, hs_row, norm_w, eps)
            a = attend_ref(linear(x, wqkv, bqkv), q_norm, k_norm, qk_norm, clip, cos, sin, K, V, pos, kpos, heads,
                           kv_heads, head_dim, window, eps, scale)
        return linear(a, wo)

    def attention(self, h, delta, hs_row, **at):
        """h + delta + the attention block (decode_ops.attention)."""
        return hs_row + self._attention_out(h, delta, hs_row, **at)

    def moe_layer(self, h, delta, hs_row, *, ffn_norm, router_w, ids_row, entries_row, base, top_k, norm_topk,
                  stride, **at):
        """decode_ops.moe_layer: (h after attention, FFN input x, ids [1, k], weights [1, k], addresses)."""
        o = self._attention_out(h, delta, hs_row, **at)
        h2 = torch.empty_like(hs_row)
        run = self.router.run if self.native else route_ref
        x, ids, weights, addrs = run(hs_row, o, h2, ffn_norm, router_w, ids_row, entries_row, base, stride, top_k,
                                     norm_topk, at["eps"])
        return h2, x, ids.view(1, top_k), weights.view(1, top_k), addrs
