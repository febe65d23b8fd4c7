"""The fused decode kernels (csrc/cuda/fm_decode.cu through flashmoe_plugin._decode_cuda), for
runtime/fused_decode.py: the only place that imports that compiled module. Each call launches on
the current CUDA stream (capturable in a CUDA graph); shapes and dtypes are checked in the module.

    available() -> (bool, why not)
    add_norm(h, delta, h_out, w, eps) -> x                 h_out <- h + delta; x = rms_norm(h_out) * w
    Attention(kv_heads, heads, head_dim, n_ctx, device)    workspace of one model's attention
        .run(qkv, ...) -> out [1, heads * head_dim]
    Router(experts, device)                                workspace of one model's routing
        .run(h, o, h_out, ...) -> x, ids [k], weights [k], addresses [k]

FLASHMOE_DECODE_PDL=0 launches them without programmatic dependent launch (benchmarks).
"""
from __future__ import annotations

import os

import torch

_M = None
_ERR = ""
QK_NORM = {"none": 0, "head": 1, "full": 2}


def module():
    global _M, _ERR
    if _M is None and not _ERR:
        try:
            from .. import _decode_cuda as m
            _M = m
            if os.environ.get("FLASHMOE_DECODE_PDL") == "0":  # benchmarks: without dependent launch
                m.pdl(False)
        except ImportError as e:  # built without nvcc
            _ERR = str(e) or type(e).__name__
    return _M


def available() -> tuple[bool, str]:
    if module() is None:
        return False, f"flashmoe_plugin._decode_cuda not built (built without nvcc?): {_ERR}"
    return True, ""


def add_norm(h: torch.Tensor, delta: torch.Tensor, h_out: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = torch.empty_like(h_out)
    module().add_norm(h, delta, h_out, w, x, eps)
    return x


class Attention:
    """One token's attention (norms, clip, RoPE, the K/V write at pos, split-key GQA softmax) with
    its workspace: partial softmax states per (KV head, split) and the per-head counters."""

    def __init__(self, kv_heads: int, heads: int, head_dim: int, n_ctx: int, device: torch.device, splits=None):
        m = module()
        idx = device.index if device.index is not None else torch.cuda.current_device()
        self.splits = int(splits or m.default_splits(kv_heads, n_ctx, idx))
        self.partial = torch.zeros(m.workspace_floats(kv_heads, heads, head_dim, self.splits), dtype=torch.float32,
                                   device=device)
        self.counters = torch.zeros(kv_heads, dtype=torch.int32, device=device)

    def run(self, qkv, q_norm, k_norm, qk_norm: str, clip, inv_freq, pos, K, V, heads: int, kv_heads: int,
            head_dim: int, window: int, eps: float, scale: float) -> torch.Tensor:
        out = torch.empty((1, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
        module().attention(qkv.contiguous(), q_norm, k_norm, QK_NORM[qk_norm], clip, inv_freq, pos, K, V, out,
                           self.partial, self.counters, heads, kv_heads, head_dim, int(window or 0), self.splits,
                           eps, scale)
        return out


class Router:
    """h + o, the FFN norm, the router GEMV, softmax, top-k and the slot lookup in one launch."""

    def __init__(self, experts: int, device: torch.device):
        self.logits = torch.zeros(experts, dtype=torch.float32, device=device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)

    def run(self, h, o, h_out, norm_w, router_w, ids_row, entries_row, base, stride: int, top_k: int,
            norm_topk: bool, eps: float):
        x = torch.empty_like(h_out)
        weights = torch.empty(top_k, dtype=h.dtype, device=h.device)
        addrs = torch.empty(top_k, dtype=torch.int64, device=h.device)
        module().route(h, o.contiguous(), h_out, x, norm_w, router_w, self.logits, self.counter, ids_row, weights,
                       entries_row, base, addrs, stride, top_k, norm_topk, eps)
        return x, ids_row, weights, addrs
