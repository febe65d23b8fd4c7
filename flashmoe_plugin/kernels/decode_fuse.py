"""A decode layer's small steps folded into kernels (runtime/decode_ops.py): inside a captured
step every kernel boundary costs a few microseconds of launch gap, and torch.compile left a
Mixtral layer with nine kernels, four of them a few hundred bytes of work each.

    if takes_norm_qkv(h, delta, norm_w, wqkv):   # the residual add and the attention norm inside
        qkv = norm_qkv(h, delta, hs_row, norm_w, wqkv, eps)   # the q/k/v GEMV's blocks (fm_gemv.cu)
    if takes_route(h, router_w, top_k):          # h + o, the FFN norm, router, softmax, top-k and
        h2, x, ids, w, addrs = route(...)        # the record addresses: one block (fm_route.cu)

Both round where the torch formulas (decode_ops.attention / route / addresses, models.layers.
rms_norm) round: the residual, the normed x and so the q/k/v products are those bit for bit; the
router's fp32 sums run in the kernel's order. The formulas stay the CPU twin and the fallback
(another device, fp32 activations, a float or GGUF-block q/k/v, a router past the kernel's sizes).
The calls are custom ops (they write hs_row / ids_row), so torch.compile sees one opaque node
each and a captured graph records the launch.

FLASHMOE_DECODE_FUSE=0 turns both off (before/after comparisons in one tree); FOLDS (bits NORM,
ROUTE) is what a DeviceDecode made next asks for (benchmarks/decode_fuse_ab.py sets it).
"""
from __future__ import annotations

import os

import torch

from . import compiled
from .packed import PackedStack

_km = compiled("_kernels_cuda")[0]
ENABLED = _km is not None and os.environ.get("FLASHMOE_DECODE_FUSE", "1") != "0"
NORM, ROUTE = 1, 2  # the folds, as bits of decode_ops' static `fold` argument
FOLDS = NORM | ROUTE if ENABLED else 0  # what the graph decode asks for (runtime/graph_decode.py)
_ACT16 = (torch.bfloat16, torch.float16)
# the compiled module's limits as plain ints (read while torch.compile traces the predicates)
_MAX_PARTS, _ROUTE_MAX_H, _ROUTE_MAX_E = (_km.GEMV_MAX_PARTS, _km.ROUTE_MAX_H, _km.ROUTE_MAX_E) if _km else (0, 0, 0)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().view(-1)
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _row(h: torch.Tensor) -> bool:
    """One token's 16-bit CUDA activation row [1, H]."""
    return ENABLED and h.device.type == "cuda" and h.dtype in _ACT16 and h.dim() == 2 and h.shape[0] == 1


def takes_norm_qkv(h: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, wqkv) -> bool:
    """Whether norm_qkv computes rms_norm(h + delta) * norm_w @ wqkv.T: a one-token 16-bit row and
    q/k/v packed q8/q4 for the CUDA backend, a product the decode GEMV runs (static for
    torch.compile: types, dtypes and shapes only)."""
    if not (_row(h) and isinstance(wqkv, PackedStack) and wqkv.uniform):
        return False
    parts, H = wqkv.parts, h.shape[1]
    p0 = parts[0]
    gemv = getattr(p0.backend, "_gemv_takes", None)
    if p0.backend.name != "cuda" or gemv is None or len(parts) > _MAX_PARTS or p0.shape[1] != H:
        return False
    if delta.shape != h.shape or delta.dtype != h.dtype or norm_w.dtype != h.dtype or norm_w.numel() != H:
        return False
    return gemv(h, p0.fmt, H, None if len(parts) > 1 else p0.shape[0])


def norm_qkv(h, delta, hs_row, norm_w, wqkv, eps: float) -> torch.Tensor:
    """h + delta into hs_row, then rms_norm(that) * norm_w @ wqkv.T in one GEMV launch: [1, rows]."""
    parts = wqkv.parts
    return torch.ops.flashmoe.norm_gemv_stack(h, delta, hs_row, norm_w, [p.data for p in parts], parts[0].fmt,
                                              [p.shape[0] for p in parts], h.shape[1], float(eps))


@torch.library.custom_op("flashmoe::norm_gemv_stack", mutates_args=("hs_row",))
def norm_gemv_stack(h: torch.Tensor, delta: torch.Tensor, hs_row: torch.Tensor, norm_w: torch.Tensor,
                    data: list[torch.Tensor], fmt: str, rows: list[int], cols: int, eps: float) -> torch.Tensor:
    """[1, sum(rows)] = rms_norm(h + delta) * norm_w @ [W_0; W_1; ...].T (packed parts `data`),
    h + delta written to hs_row (fm_gemv.cu's fmc_gemv_norm)."""
    out = torch.empty((1, sum(rows)), dtype=h.dtype, device=h.device)
    if hs_row.data_ptr() % 16 or not hs_row.is_contiguous():
        raise ValueError("norm_gemv_stack: hs_row must be contiguous and 16-byte aligned")
    _km.gemv_norm(list(data), fmt, list(rows), cols, _aligned(h), _aligned(delta), _aligned(norm_w), eps,
                  hs_row.view(-1), out, _stream(h))
    return out


@norm_gemv_stack.register_fake
def _(h, delta, hs_row, norm_w, data, fmt, rows, cols, eps):
    return h.new_empty((1, sum(rows)))


def takes_route(h: torch.Tensor, norm_w: torch.Tensor, router_w, top_k: int) -> bool:
    """Whether route computes this MoE layer's routing: a one-token 16-bit row, a float router
    [E, H] of its dtype within the kernel's sizes."""
    if not (_row(h) and isinstance(router_w, torch.Tensor) and router_w.dim() == 2):
        return False
    E, H = router_w.shape
    return (router_w.dtype == h.dtype and norm_w.dtype == h.dtype and H == h.shape[1] and H % 8 == 0
            and H <= _ROUTE_MAX_H and E <= _ROUTE_MAX_E and 1 <= top_k <= min(32, E))


def route(h, o, norm_w, router_w, ids_row, entries_row, base, stride: int, eps: float, top_k: int,
          norm_topk: bool):
    """(h2, x, ids [1, k], weights [1, k], addrs [k]) of decode_ops.attention's residual h2 = h + o,
    then decode_ops.route and addresses on it, in one launch; ids also into ids_row."""
    return torch.ops.flashmoe.decode_route(h, o, norm_w, router_w, ids_row, entries_row, base, int(stride),
                                           float(eps), int(top_k), bool(norm_topk))


@torch.library.custom_op("flashmoe::decode_route", mutates_args=("ids_row",))
def decode_route(h: torch.Tensor, o: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor,
                 ids_row: torch.Tensor, entries_row: torch.Tensor, base: torch.Tensor, stride: int, eps: float,
                 top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    """One token's routing after attention (fm_route.cu's fmc_route); see route."""
    h2, x = torch.empty_like(h), torch.empty_like(h)
    weights = torch.empty((1, top_k), dtype=h.dtype, device=h.device)
    ids = torch.empty((1, top_k), dtype=torch.int64, device=h.device)
    addrs = torch.empty((top_k,), dtype=torch.int64, device=h.device)
    _km.route(_aligned(h), _aligned(o), _aligned(norm_w), router_w.contiguous(), top_k, eps, norm_topk,
              entries_row.contiguous(), base.contiguous(), stride, h2.view(-1), x.view(-1), weights.view(-1),
              ids.view(-1), ids_row, addrs, _stream(h))
    return h2, x, ids, weights, addrs


@decode_route.register_fake
def _(h, o, norm_w, router_w, ids_row, entries_row, base, stride, eps, top_k, norm_topk):
    return (torch.empty_like(h), torch.empty_like(h), h.new_empty((1, top_k), dtype=torch.int64),
            h.new_empty((1, top_k)), h.new_empty((top_k,), dtype=torch.int64))
