"""A dense weight matrix kept packed: our group formats (q8/q4/q2, raw bf16/f16/f32) or a GGUF
file's own blocks (q4_0, q8_0, q4_k, q6_k, ...) as they lie in the file, computed by
`Backend.linear` (the fused dequantizing C/CUDA kernels, or the torch reference) instead of being
dequantized to floats at load. The models hold it in their weight dict like a tensor and call
models.layers.linear / embed, which dispatch here.

    w = PackedWeight.quantize(weight, "q8", backend, dtype)   # at load (runtime/dense_quant.py)
    y = w.linear(x)                                           # x [T, in] -> [T, out]
    e = w.rows(token_ids)                                     # embedding rows, dequantized

The product runs through the custom op `flashmoe::packed_linear`, so torch.compile sees one
opaque node (its output shape known) and a captured CUDA graph records the backend's kernel
launches like any other op.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import quant
from ..quant_gguf import BLOCK_FORMATS, is_block_format, row_nbytes


@functools.lru_cache(maxsize=8)
def _backend(name: str, device_type: str):
    from . import select
    return select(device_type, name)


@torch.library.custom_op("flashmoe::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, rows: int, cols: int, backend: str) -> torch.Tensor:
    """x [T, cols] @ W.T for the packed W [rows, cols] in `data`, by the named kernel backend."""
    return _backend(backend, x.device.type).linear(x.contiguous(), data, fmt, (rows, cols)).to(x.dtype)


@packed_linear.register_fake
def _(x, data, fmt, rows, cols, backend):
    return x.new_empty((*x.shape[:-1], rows))


@torch.library.custom_op("flashmoe::packed_linear_stack", mutates_args=())
def packed_linear_stack(x: torch.Tensor, data: list[torch.Tensor], fmt: str, rows: list[int], cols: int,
                        backend: str) -> torch.Tensor:
    """x [T, cols] @ [W_0; W_1; ...].T for packed parts of one format: Backend.linear_stack."""
    shapes = [(r, cols) for r in rows]
    return _backend(backend, x.device.type).linear_stack(x.contiguous(), list(data), fmt, shapes).to(x.dtype)


@packed_linear_stack.register_fake
def _(x, data, fmt, rows, cols, backend):
    return x.new_empty((*x.shape[:-1], sum(rows)))


class PackedWeight:
    """One weight [out, in] in a packed format; `dtype` is the activation dtype it computes in."""

    def __init__(self, data: torch.Tensor, fmt: str, shape, backend, dtype: torch.dtype):
        self.data, self.fmt, self.shape = data, fmt, (int(shape[0]), int(shape[1]))
        self.backend, self.dtype = backend, dtype
        need = quant.part_nbytes(fmt, self.shape)
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() < need:
            raise ValueError(f"packed weight {fmt} {self.shape}: needs a 1-D uint8 tensor of {need} bytes, "
                             f"got {data.dtype} {list(data.shape)}")

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str, backend, dtype: torch.dtype, device=None,
                 fit: str = "search") -> "PackedWeight":
        """Pack a float matrix into one of our formats (the converter's quantizer; fit="absmax":
        the one-pass q8 of kernels/quantize.py)."""
        from .quantize import quantize
        data = quantize(w if fit == "absmax" else w.to(torch.float32), fmt, fit=fit)
        return cls(data.to(device or w.device), fmt, w.shape, backend, dtype)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self):
        return f"PackedWeight({self.fmt}, {list(self.shape)}, {self.device}, {self.backend.name})"

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.flashmoe.packed_linear(x.reshape(-1, self.shape[1]), self.data, self.fmt, self.shape[0],
                                             self.shape[1], self.backend.name).view(*lead, self.shape[0])
        return y if bias is None else y + bias

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.backend.dequantize(self.data, self.fmt, self.shape, dtype or self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids (any shape) dequantized to self.dtype: an embedding lookup [*ids.shape, in]."""
        flat = ids.reshape(-1)
        part = self._gather(flat)
        out = self.backend.dequantize(part, self.fmt, (flat.numel(), self.shape[1]), self.dtype)
        return out.view(*ids.shape, self.shape[1])

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The packed part holding only rows `flat` (same format, shape [len(flat), in])."""
        rows, cols = self.shape
        if is_block_format(self.fmt):  # each row is whole blocks, back to back
            rb = row_nbytes(self.fmt, cols)
            return self.data[:rows * rb].view(rows, rb).index_select(0, flat).reshape(-1)
        n = flat.numel()
        out = torch.zeros(quant.part_nbytes(self.fmt, (n, cols)), dtype=torch.uint8, device=self.device)
        dst, src = quant.views(out, self.fmt, (n, cols)), quant.views(self.data, self.fmt, self.shape)
        for name, v in src.items():
            dst[name].copy_(v.index_select(0, flat))
        return out


class PackedStack:
    """Several packed weights that share an input, computed as one [sum of outs, in] product
    (the graph decode's fused q/k/v). Parts of one format and backend go through one
    Backend.linear_stack call (on CUDA one launch over the parts where they lie: no copy, no
    cat); otherwise (a float tensor among them) each part runs its own product, concatenated."""

    def __init__(self, parts: list):  # PackedWeights (a float tensor among them is fine)
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
        first = parts[0]
        self.uniform = all(isinstance(p, PackedWeight) and p.fmt == first.fmt and p.backend is first.backend
                           and p.device == first.device and p.shape[1] == first.shape[1] for p in parts)

    @property
    def device(self):
        return self.parts[0].device

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.uniform:
            lead, p0 = x.shape[:-1], self.parts[0]
            y = torch.ops.flashmoe.packed_linear_stack(x.reshape(-1, self.shape[1]), [p.data for p in self.parts],
                                                       p0.fmt, [p.shape[0] for p in self.parts], self.shape[1],
                                                       p0.backend.name).view(*lead, self.shape[0])
        else:
            y = torch.cat([F.linear(x, p) if isinstance(p, torch.Tensor) else p.linear(x) for p in self.parts], dim=-1)
        return y if bias is None else y + bias


def is_packed(w) -> bool:
    return isinstance(w, (PackedWeight, PackedStack))


def concat_rows(ws: list):
    """q, k and v stacked into one weight: a tensor for float tensors, a PackedStack otherwise."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws)
    return PackedStack(list(ws))


__all__ = ["PackedWeight", "PackedStack", "is_packed", "concat_rows", "BLOCK_FORMATS"]
