"""The reference backend: dequantize with quant.py, then plain torch matmuls. Runs wherever torch
runs (CPU, CUDA, MPS); the native backends are tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant
from ..hookspecs import hookimpl
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps")
    priority = 0

    def weight(self, record: torch.Tensor, layout, name: str, dtype: torch.dtype) -> torch.Tensor:
        p = layout.part(name)
        return quant.dequantize(layout.part_bytes(record, name), p.format, p.shape, dtype)

    def expert_ffn(self, x, record, layout):
        w13 = self.weight(record, layout, "w13", x.dtype)
        w2 = self.weight(record, layout, "w2", x.dtype)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)


@hookimpl
def register_backends(register):
    register(TorchBackend())
