"""One MoE layer's routing of one decode token as one CUDA launch (csrc/cuda/fm_route.cu): the
residual add, the FFN norm, the router, softmax, top-k and the experts' record addresses, which
runtime/decode_ops.py's torch code computes in four kernels inside the decode graph. Exposed as
the custom op `flashmoe::route_decode` so torch.compile sees one opaque node and a captured graph
records its launch. The torch code stays the CPU twin and the path wherever `usable` says no.
FLASHMOE_ROUTE=0 turns it off (comparisons)."""
from __future__ import annotations

import os

import torch

from . import compiled


def usable(device: torch.device, dtype: torch.dtype, norm_ws, router_ws, k: int) -> bool:
    """Whether every MoE layer's routing (its FFN norm and router weights) can take the kernel."""
    mod, _ = compiled("_route_cuda")
    if mod is None or device.type != "cuda" or os.environ.get("FLASHMOE_ROUTE", "1") == "0":
        return False
    ok = all(isinstance(w, torch.Tensor) and w.dtype == dtype and w.is_contiguous() and w.device == device
             for w in (*norm_ws, *router_ws))
    return ok and bool(router_ws) and all(w.dim() == 2 and k <= min(w.shape[0], mod.MAX_K) and w.shape[0] <= mod.MAX_E
                                         and w.shape[1] % 64 == 0 for w in router_ws)


def workspace(device: torch.device, num_experts: int) -> torch.Tensor:
    """The launch's workspace (zeroed; each launch leaves it zeroed). One per decode step
    runner: launches on one stream take turns with it."""
    return torch.zeros(compiled("_route_cuda")[0].workspace_bytes(num_experts), dtype=torch.uint8, device=device)


@torch.library.custom_op("flashmoe::route_decode", mutates_args=("ids_row", "workspace"))
def route_decode(h_in: torch.Tensor, o: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor,
                 entries: torch.Tensor, base: torch.Tensor, ids_row: torch.Tensor, workspace: torch.Tensor,
                 stride: int, k: int, normalize: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, x, ids [1, k], weights [1, k], addresses [k]) of decode_ops.moe_layer's routing, with
    h = h_in + o; ids also written to ids_row."""
    h, x = torch.empty_like(h_in), torch.empty_like(h_in)
    ids = torch.empty((1, k), dtype=torch.int64, device=h_in.device)
    weights = h_in.new_empty((1, k))
    addrs = torch.empty(k, dtype=torch.int64, device=h_in.device)
    compiled("_route_cuda")[0].route(h_in.contiguous(), o.contiguous(), norm_w, router_w, k, normalize, eps, entries,
                                     base, stride, ids_row, workspace, h, x, weights, ids, addrs)
    return h, x, ids, weights, addrs


@route_decode.register_fake
def _(h_in, o, norm_w, router_w, entries, base, ids_row, workspace, stride, k, normalize, eps):
    return (torch.empty_like(h_in), torch.empty_like(h_in), h_in.new_empty((1, k), dtype=torch.int64),
            h_in.new_empty((1, k)), h_in.new_empty((k,), dtype=torch.int64))
