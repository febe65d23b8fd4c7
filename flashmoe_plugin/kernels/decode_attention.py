"""One decode token's attention block as one CUDA kernel (csrc/cuda/fm_attn.cu, wrapped by
cython/_attn_cuda.pyx): RoPE of q and k, the K/V cache writes at the position, and GQA attention
over positions 0..pos, for runtime/decode_ops.attention between the q/k/v and the o products.

The torch formula there (5 kernels per layer, over the whole cache under a mask) stays the CPU
twin and the fallback where this kernel is not built, not on the tensors' device or not made for
the shape (`takes`). The call is the custom op `flashmoe::decode_attention` (it writes K and V),
so torch.compile sees one opaque node and a captured CUDA graph records the launch; the position
is read on the device, so the graph replays it at every position.

    if takes(K, heads, q.dtype):
        out = decode_attention(q, k, v, cos, sin, K, V, pos, window, scale)   # [1, heads * D]

FLASHMOE_ATTN=0 turns the kernel off (the torch formula everywhere: before/after comparisons).
H200, Mixtral shapes, bf16, µs per layer inside a graph (benchmarks/decode_attention.py, one call):
10.9 against the formula's 13.2 at the last of 552 positions, 5.1 against 13.1 at position 0,
29.8 against 35.9 at 8192; rival row 6 (q4 dense) 271.6 tok/s (benchmarks/README.md, issue 9).
On sm_90 up to tune("cluster_ctx") positions of cache the chunks merge in a cluster's shared
memory (no second pass through global memory); the first tile's loads go before the PDL wait.
Same bench, session 9 (a11, main's module in the same call): 9.77 against 10.82 at the last of
552 positions, 5.91 against 8.08 at 128, 28.89 against 29.64 at 8192.
"""
from __future__ import annotations

import os

import torch

from . import compiled

_km = compiled("_attn_cuda")[0]
ENABLED = _km is not None and os.environ.get("FLASHMOE_ATTN", "1") != "0"
HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_workspaces: dict[tuple, torch.Tensor] = {}


def takes(K: torch.Tensor, heads: int, dtype: torch.dtype) -> bool:
    """Whether the kernel computes a layer with cache K [n_ctx, kv_heads, head_dim] and q of
    `dtype` (static for torch.compile: device type, dtypes and shapes only)."""
    return ENABLED and K.device.type == "cuda" and K.dtype in _DTYPES and dtype == K.dtype and K.dim() == 3 and \
        K.shape[2] in HEAD_DIMS and heads % K.shape[1] == 0


def _workspace(heads: int, K: torch.Tensor) -> torch.Tensor:
    """Per (device, stream, size) one zeroed workspace, kept for the process: a captured graph
    holds its address (launches on one stream run one after another, so layers share it)."""
    n_ctx, kvh, d = K.shape
    dev = K.device.index if K.device.index is not None else torch.cuda.current_device()
    need = _km.workspace_bytes(heads, kvh, d, n_ctx, dev)
    key = (dev, torch.cuda.current_stream(K.device).cuda_stream, need)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = torch.zeros(need, dtype=torch.uint8, device=K.device)
    return ws


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


@torch.library.custom_op("flashmoe::decode_attention", mutates_args=("K", "V"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     K: torch.Tensor, V: torch.Tensor, pos: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """q [1, heads*D], k and v [1, kv_heads*D] (not yet rotated), cos/sin [.., D] of the position
    pos (int64 [1] on the device): k rotated and v written to K/V [n_ctx, kv_heads, D] at pos,
    then the attention output [1, heads*D] over positions 0..pos (the last `window` if > 0)."""
    out = torch.empty((1, q.numel()), dtype=q.dtype, device=q.device)
    heads = q.numel() // K.shape[2]
    _km.decode_attention(_aligned(q), _aligned(k), _aligned(v), _aligned(cos), _aligned(sin), K, V, pos,
                         int(window), float(scale), out, _workspace(heads, K))
    return out


@decode_attention.register_fake
def _(q, k, v, cos, sin, K, V, pos, window, scale):
    return q.new_empty((1, q.numel()))


def tune(key: str, value: int | None = None) -> int:
    """The kernel's knobs (splits, pdl, min_chunk, cluster_ctx) and its last launch's figures
    (last_splits, last_grid, last_cluster: benchmarks, tests)."""
    if _km is None:
        raise RuntimeError(f"flashmoe_plugin._attn_cuda not built: {compiled('_attn_cuda')[1]}")
    return _km.tune(key, value)
