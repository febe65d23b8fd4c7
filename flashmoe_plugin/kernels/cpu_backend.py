"""The native CPU backend: fused dequant kernels in C (csrc/cpu/fm_kernels*.c) through the compiled
module flashmoe_plugin._cpu_kernels (cython/_cpu_kernels.pyx).

Activations are computed in fp32 (other float dtypes are converted on the way in and out). The
kernels run on the module's own thread pool with the GIL released; its size defaults to
torch.get_num_threads() when the backend is created, so that torch's threads and ours take turns
on the same cores instead of oversubscribing them. `CpuBackend.set_num_threads(n)` changes it.
FLASHMOE_CPU_ISA=portable|avx2|avx512 forces an instruction-set level (for comparisons).
Decode (one token) of q4 / q8 weights takes the activations as 21-bit integers per group of 64 and
dots them with the codes in integers (csrc/cpu/fm_kernels_xi.c; error at fp32 rounding's level);
FLASHMOE_CPU_ACT=f32 (or the module's set_int_act(False)) keeps fp32 activations there too.
A decode MoE layer is one pass without a barrier between gate/up and down (csrc/cpu/fm_moe1.c,
same bits); FLASHMOE_CPU_MOE1=0 (or set_moe1(0)) keeps the two-phase path.

llama.cpp's block formats (a GGUF store's parts, csrc/cpu/fm_gguf*.c) compute as llama.cpp's CPU
matmuls do by default: each activation row is quantized to the weight type's Q8_0 / Q8_1 / Q8_K
blocks and dotted in integers, so quantized GGUFs give llama.cpp's logits (gguf_act "q8").
`gguf_act="f32"` (or FLASHMOE_GGUF_ACT=f32) keeps fp32 activations over the exactly dequantized
weights instead.
"""
from __future__ import annotations

import functools
import os

import torch

from . import compiled
from .base import Backend

MODULE = "flashmoe_plugin._cpu_kernels"


def _load():
    k, why = compiled("_cpu_kernels")  # not built (pure-Python checkout) or built for another interpreter
    return k, f"compiled module {MODULE} not built: {why}" if k is None else ""


def _gguf_module():
    g, why = compiled("_gguf_kernels")
    if g is None:
        raise RuntimeError(f"compiled module flashmoe_plugin._gguf_kernels (llama.cpp block formats) not built: {why}")
    return g


@functools.lru_cache(maxsize=64)
def _gguf_spec(layout):
    """The part spec of a record holding a llama.cpp block format, else None (our own formats)."""
    from ..quant_gguf import is_block_format
    if not any(is_block_format(p.format) for p in layout.parts):
        return None
    w13, w2 = layout.part("w13"), layout.part("w2")
    return ((w13.format, w13.offset, w13.shape), (w2.format, w2.offset, w2.shape))


@functools.lru_cache(maxsize=64)
def _spec(module, layout):
    return module.ExpertSpec.from_layout(layout)


class CpuBackend(Backend):
    name = "cpu"
    devices = ("cpu",)
    priority = 10  # above the torch reference (0)

    def __init__(self, num_threads: int | None = None, gguf_act: str | None = None):
        self.gguf_act = gguf_act or os.environ.get("FLASHMOE_GGUF_ACT") or "q8"
        if self.gguf_act not in ("q8", "f32"):
            raise ValueError(f"gguf_act (FLASHMOE_GGUF_ACT): expected 'q8' or 'f32', got {self.gguf_act!r}")
        self._k, self._why = _load()
        if self._k is not None:
            self.set_num_threads(num_threads if num_threads else torch.get_num_threads())

    # ------------------------------------------------------------------ configuration
    def available(self) -> tuple[bool, str]:
        return (True, "") if self._k is not None else (False, self._why)

    @property
    def module(self):
        if self._k is None:
            raise RuntimeError(f"kernel backend 'cpu' is not available here: {self._why}")
        return self._k

    def set_num_threads(self, n: int) -> None:
        """Threads the native kernels use (n <= 0: every CPU this process may run on)."""
        self.module.set_num_threads(int(n))

    @property
    def num_threads(self) -> int:
        return self.module.get_num_threads()

    def set_spin_us(self, us: int) -> None:
        """How long the pool's idle threads spin for the next call before they sleep (default 50 us):
        a caller whose calls come further apart pays their wake-up in every call."""
        self.module.set_spin_us(int(us))

    @property
    def isa(self) -> str:
        """The instruction-set level in use: portable, avx2 or avx512."""
        return self.module.isa()

    def spec(self, layout):
        """The native description of a store.layout.RecordLayout (cached)."""
        return _spec(self.module, layout)

    # ------------------------------------------------------------------ compute
    @staticmethod
    def _f32(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"cpu backend: x must be on the CPU, got {x.device}")
        return x.to(torch.float32).contiguous()

    def moe(self, x: torch.Tensor, records, weights, layout) -> torch.Tensor:
        """sum_e weights[e] * expert_e(x) for x [T, H] in one native call -> [T, H] (x's dtype)."""
        xf = self._f32(x)
        out = torch.zeros_like(xf)
        gspec = _gguf_spec(layout)
        if gspec is not None:  # llama.cpp block formats (a GGUF store): csrc/cpu/fm_gguf.c
            g = _gguf_module()
            if g.get_num_threads() != self.num_threads:
                g.set_num_threads(self.num_threads)
            g.moe(xf, records, [float(w) for w in weights], gspec, out, act=self.gguf_act)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        self.module.moe(xf, records, weights, self.spec(layout), out)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def expert_ffn(self, x: torch.Tensor, record: torch.Tensor, layout) -> torch.Tensor:
        return self.moe(x, (record,), (1.0,), layout)

    def moe_decode(self, x: torch.Tensor, records, weights: torch.Tensor, layout) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"moe_decode: x must be [1, H], got {list(x.shape)}")
        return self.moe(x, records, weights, layout)

    def linear(self, x: torch.Tensor, part: torch.Tensor, fmt: str, shape) -> torch.Tensor:
        """x [T, in] @ W.T for one weight part (uint8 tensor) of format fmt and shape [out, in]."""
        xf = self._f32(x)
        from ..quant_gguf import is_block_format
        if is_block_format(fmt):
            y = _gguf_module().linear(xf, part, fmt, tuple(shape), act=self.gguf_act)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        y = self.module.linear(xf, part, fmt, tuple(shape))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize(self, part: torch.Tensor, fmt: str, shape, dtype: torch.dtype) -> torch.Tensor:
        from ..quant_gguf import is_block_format
        if is_block_format(fmt):
            return _gguf_module().dequantize(part, fmt, tuple(shape)).to(dtype)
        return self.module.dequantize(part, fmt, tuple(shape)).to(dtype)
