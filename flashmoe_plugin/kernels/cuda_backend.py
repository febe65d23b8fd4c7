"""The native CUDA backend: fused dequant kernels from flashmoe_plugin._kernels_cuda
(csrc/cuda/fm_kernels.cu, wrapped by cython/_kernels_cuda.pyx).

- decode (`moe_decode`): one fused call for all of a layer's selected experts: gate/up GEMVs,
  SwiGLU, down GEMVs and the weighted sum, as one cooperative launch (grid barrier between the
  two halves) where the device allows it, else two launches;
- prefill (`expert_ffn`, T tokens through one expert): up to `fused_max_tokens` tokens the same
  fused kernel (it reads the weights once per 4 tokens); above that, dequantize to the
  activation dtype with our kernel and multiply with cuBLAS through torch. Measured on an H200
  (bench/kernels_cuda.py, entries "prefill_expert", q4, bf16): Mixtral expert 4096->14336,
  fused 41/67/69/138/275/548 us at T = 1/2/4/8/16/32 against 350-356 us for dequantize +
  cuBLAS; Qwen3.5 expert 4096->1024, fused 9/14/15/29/58 us at T = 1/2/4/8/16 against 37-40 us.
  Crossover ~20 tokens (Mixtral) and ~10 (Qwen3.5): 8 is right for both. With the coalesced
  dequantize kernel (8 elements per thread) dequantize + cuBLAS is 230-238 us for the Mixtral
  expert at T = 1..64 (the fused kernel: 39/70/276 us at T = 1/4/16), near its own floor: it
  writes and then reads back 352 MB of bf16 weights: the crossover moves to ~13 tokens (12);
- prefill through a layer's experts (`grouped_ffn`): up to `grouped_max_tokens` tokens per expert
  on average, one launch for all experts' gate/up + SwiGLU and one for the down projections,
  a mixed-input tensor-core GEMM (csrc/cuda/fm_prefill.cu, kernels/prefill_cuda.py), else per
  expert as above;
- raw (f32/f16/bf16) parts go through torch.

Importing this module never needs a GPU or the compiled module: available() says what is missing.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import compiled
from .base import Backend


def kernels():
    """The compiled module, or None (the import error is kept for available())."""
    return compiled("_kernels_cuda")[0]


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    priority = 10
    # Tokens per expert up to which the fused kernel beats dequantize + cuBLAS (prefill): with
    # the coalesced dequantize, the Mixtral expert's crossover is ~13 tokens (H200, quick bench).
    fused_max_tokens = 12
    # Mean tokens per expert up to which the grouped prefill kernel (csrc/cuda/fm_prefill.cu)
    # runs a layer's experts, above that dequantize + cuBLAS per expert. H200, Mixtral expert,
    # us per expert, grouped vs dequantize + cuBLAS (benchmarks/results/h200-p9b-kernels.json):
    # q4 96/141/274/542 vs 241/248/257/301 at 16/64/128/256 tokens, q8 132/179/341 vs
    # 257/264/273 at 16/64/128. At Mixtral's 128 per expert (512-token prompt) an expert at a
    # time is faster on the device but host-bound (one read-back of the counts per layer and ~3900
    # launches per prompt): 5942 tok/s in prefill_profile.py's engine, but 3141 (bf16 dense) and
    # 4429 (q8) inside `flashmoe bench` in the rival run (h200-lead-call-a.json), where the grouped
    # kernel reads nothing back and does not depend on the host's pace.
    grouped_max_tokens = {"q4": 128, "q8": 96}
    # Dense q8/q4 products through the decode GEMV (csrc/cuda/fm_gemv.cu) where it measured faster
    # than fmc_linear on the H200 (benchmarks/results/h200-g9-dense-gemv.json, us per call):
    # stacked parts at 1..4 tokens (q/k/v 6144x4096: q8 12.5 vs 20.0 at one token, 26 vs 38 at
    # four; q4 8.2 vs 16.5), one part at one token up to gemv_max_elems weights (o 4096x4096: q8
    # 7.0 vs 8.5, q4 5.0 vs 6.2; k/v 1024x4096: 2.9 vs 5.3). Larger parts (lm_head 32000x4096,
    # 14336-wide MLPs) stay on fmc_linear's persistent stream (q8 32000x4096: 39 vs 49 us), and so
    # do single parts at 2..4 tokens. FLASHMOE_GEMV=0 routes everything back to fmc_linear (before/after).
    # The GEMV picks its own kernel (a block per item in one wave, a persistent grid past it: q/k/v
    # q8 12.6 -> 8.8 us, q4 8.2 -> 7.2; h200-k9c-call1/2.json); lm_head q8 there: 36.7-39.1 us against
    # fmc_linear's 38.7, q4 30.8 against 23.7, so large parts stay on fmc_linear.
    gemv = os.environ.get("FLASHMOE_GEMV", "1") != "0"
    gemv_max_elems = 1 << 25

    def __init__(self):
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ availability
    def available(self) -> tuple[bool, str]:
        k = kernels()
        if k is None:
            return False, f"flashmoe_plugin._kernels_cuda not built (built without nvcc?): {compiled('_kernels_cuda')[1]}"
        if not torch.cuda.is_available():
            return False, "no NVIDIA GPU visible (torch.cuda.is_available() is false)"
        if k.device_count() == 0:
            return False, f"the CUDA runtime sees no GPU: {k.device_error()}"
        return True, ""

    def _require(self):
        k = kernels()
        if k is None:
            raise RuntimeError(f"kernel backend 'cuda' is not available: {self.available()[1]}")
        return k

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def layout_tuple(layout) -> tuple:
        w13, w2 = layout.part("w13"), layout.part("w2")
        return (w13.format, layout.hidden, layout.intermediate, w13.offset, w2.offset, w2.offset + w2.nbytes)

    def workspace(self, device: torch.device, k: int, inter: int) -> torch.Tensor:
        """A zeroed-at-birth workspace per (device, stream); grown when a call needs more."""
        km = self._require()
        stream = torch.cuda.current_stream(device)
        key = (device.index if device.index is not None else torch.cuda.current_device(), stream.cuda_stream)
        need = km.workspace_bytes(k, inter)
        ws = self._workspaces.get(key)
        if ws is None or ws.numel() < need:
            ws = torch.zeros(max(need, 1 << 16), dtype=torch.uint8, device=device)
            self._workspaces[key] = ws
        return ws

    @staticmethod
    def _gguf(layout) -> bool:
        from ..quant_gguf import is_block_format
        return any(is_block_format(p.format) for p in layout.parts)

    def gguf_ffn(self, x: torch.Tensor, record: torch.Tensor, layout) -> torch.Tensor:
        """llama.cpp block formats (a GGUF store): our bit-exact dequantize kernel
        (csrc/cuda/fm_gguf.cu), then cuBLAS through torch."""
        try:
            from .. import _gguf_kernels_cuda as g
        except ImportError as e:
            raise RuntimeError(f"flashmoe_plugin._gguf_kernels_cuda not built (built without nvcc?): {e}") from None

        def weight(name):
            p = layout.part(name)
            return g.dequantize(layout.part_bytes(record, name), p.format, p.shape).to(x.dtype)
        gate, up = F.linear(x, weight("w13")).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight("w2"))

    @staticmethod
    def _native(layout) -> bool:
        fmts = {p.format for p in layout.parts}
        return len(fmts) == 1 and next(iter(fmts)) in ("q8", "q4", "q2")

    @staticmethod
    def _torch_backend():
        from .torch_backend import TorchBackend
        return TorchBackend()

    # ------------------------------------------------------------------ Backend API
    def expert_ffn(self, x: torch.Tensor, record: torch.Tensor, layout) -> torch.Tensor:
        if self._gguf(layout):
            return self.gguf_ffn(x, record, layout)
        if not self._native(layout):
            return self._torch_backend().expert_ffn(x, record, layout)
        km = self._require()
        x = x.contiguous()
        if x.shape[0] <= self.fused_max_tokens:
            out = torch.empty_like(x)
            ws = self.workspace(x.device, 1, layout.intermediate)
            km.moe([record], self.layout_tuple(layout), None, x, out, ws,
                   torch.cuda.current_stream(x.device).cuda_stream)
            return out
        return self.dequant_ffn(x, record, layout)

    def dequant_ffn(self, x: torch.Tensor, record: torch.Tensor, layout) -> torch.Tensor:
        """Prefill path for many tokens: our dequantize kernel, then cuBLAS (torch matmuls)."""
        km = self._require()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        H, I = layout.hidden, layout.intermediate
        p13, p2 = layout.part("w13"), layout.part("w2")
        w13 = torch.empty(2 * I, H, dtype=x.dtype, device=x.device)
        km.dequant(layout.part_bytes(record, "w13"), p13.format, 2 * I, H, w13, stream)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        del w13
        h = F.silu(gate) * up
        w2 = torch.empty(H, I, dtype=x.dtype, device=x.device)
        km.dequant(layout.part_bytes(record, "w2"), p2.format, H, I, w2, stream)
        return F.linear(h, w2)

    def moe(self, x: torch.Tensor, records: list[torch.Tensor], weights, layout) -> torch.Tensor:
        """sum_e weights[e] * expert_e(x) for x [T, H], the records of one layout (an expert's slices,
        store/slices.py): for few tokens one fused call, for many each record dequantized into one
        stack and two GEMMs for all of them (as dequant_ffn for one record)."""
        km = self._require() if self._native(layout) else None
        weights = [float(w) for w in weights]
        if km is None or len(records) > km.MAX_K:
            out = torch.zeros_like(x)
            for rec, w in zip(records, weights):
                out.add_(self.expert_ffn(x, rec, layout), alpha=w)
            return out
        x = x.contiguous()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        T, H, I, q = x.shape[0], layout.hidden, layout.intermediate, len(records)
        if T <= self.fused_max_tokens:
            out = torch.empty_like(x)
            km.moe(list(records), self.layout_tuple(layout), weights, x, out,
                   self.workspace(x.device, q, I), stream)
            return out
        p13, p2 = layout.part("w13"), layout.part("w2")
        w13 = torch.empty(q, 2 * I, H, dtype=x.dtype, device=x.device)
        w2 = torch.empty(q, H, I, dtype=x.dtype, device=x.device)
        for j, rec in enumerate(records):
            km.dequant(layout.part_bytes(rec, "w13"), p13.format, 2 * I, H, w13[j], stream)
            km.dequant(layout.part_bytes(rec, "w2"), p2.format, H, I, w2[j], stream)
        g = F.linear(x, w13.view(q * 2 * I, H)).view(T, q, 2, I)
        del w13
        h = F.silu(g[:, :, 0]) * g[:, :, 1]  # [T, q, I]
        if any(w != 1.0 for w in weights):
            h = h * torch.tensor(weights, dtype=h.dtype, device=h.device)[None, :, None]
        return F.linear(h.reshape(T, q * I), w2.permute(1, 0, 2).reshape(H, q * I))

    def grouped_ffn(self, x: torch.Tensor, records: list[torch.Tensor], counts, layout,
                    most: int | None = None) -> torch.Tensor:
        """Prefill through a layer's experts in two launches of the grouped tensor-core GEMM
        (kernels/prefill_cuda.py; counts on the device: nothing is read back) when some expert
        may have more tokens than the fused kernel takes and the experts have on average at most
        grouped_max_tokens each; else (or for other formats and dtypes) one expert_ffn per expert
        (dequantize + cuBLAS, which is faster for many tokens per expert)."""
        from . import prefill_cuda
        on_device = isinstance(counts, torch.Tensor)
        bound = (most or x.shape[0]) if on_device else max(counts, default=0)
        mean = x.shape[0] / max(len(records), 1)
        if bound > self.fused_max_tokens and prefill_cuda.supports(x, layout) and \
                mean <= self.grouped_max_tokens.get(layout.part("w13").format, 0):
            return prefill_cuda.grouped_ffn(x, records, counts, layout, most=most)
        return super().grouped_ffn(x, records, counts, layout)

    def moe_decode(self, x: torch.Tensor, records: list[torch.Tensor], weights: torch.Tensor, layout) -> torch.Tensor:
        if not self._native(layout):
            return super().moe_decode(x, records, weights, layout)
        km = self._require()
        x = x.contiguous()
        if isinstance(weights, torch.Tensor) and weights.is_cuda:
            weights = weights.reshape(-1)
            if not weights.is_contiguous() or weights.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                weights = weights.float().contiguous()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        lt = self.layout_tuple(layout)
        records = list(records)
        out = torch.empty_like(x)
        step = km.MAX_K
        for i in range(0, len(records), step):
            part = records[i:i + step]
            w = weights[i:i + step] if weights is not None else None
            ws = self.workspace(x.device, len(part), layout.intermediate)
            if i == 0:
                km.moe(part, lt, w, x, out, ws, stream)
            else:  # more than MAX_K experts: accumulate (rare; no model routes to > 32)
                more = torch.empty_like(x)
                km.moe(part, lt, w, x, more, ws, stream)
                out.add_(more)
        return out

    def moe_addresses(self, x: torch.Tensor, addresses: torch.Tensor, weights: torch.Tensor, layout,
                      workspace: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        """moe_decode with the records given as a device array of k record addresses (int64),
        e.g. looked up in the slot table on the device: nothing is read back to the host, so the
        call can be captured in a CUDA graph. `workspace` (zeroed once, workspace_bytes(k, I))
        belongs to the caller; native quantized layouts only."""
        if not self._native(layout):
            raise ValueError(f"moe_addresses needs a q8/q4/q2 record layout, not {[p.format for p in layout.parts]}")
        km = self._require()
        out = torch.empty_like(x)
        km.moe(addresses, self.layout_tuple(layout), weights.reshape(-1), x.contiguous(), out, workspace,
               torch.cuda.current_stream(x.device).cuda_stream, mode)
        return out

    # ------------------------------------------------------------------ packed dense weights
    def _gemv_takes(self, x: torch.Tensor, fmt: str, cols: int, rows: int | None = None) -> bool:
        """Whether the decode GEMV (csrc/cuda/fm_gemv.cu) runs this product: q8/q4, 1..4 tokens of
        bf16/f16 x (x's image within shared memory: K up to 16384 at 4 tokens); for one part
        (rows given) only at one token and up to gemv_max_elems weights (see above)."""
        T = x.shape[0]
        ok = self.gemv and fmt in ("q8", "q4") and 1 <= T <= 4 and x.dtype in _ACT16 and T * cols <= 1 << 16
        return ok and (rows is None or (T == 1 and rows * cols <= self.gemv_max_elems))

    def _gemv(self, x: torch.Tensor, parts: list[torch.Tensor], fmt: str, rows: list[int], cols: int) -> torch.Tensor:
        out = torch.empty((x.shape[0], sum(rows)), dtype=x.dtype, device=x.device)
        self._require().gemv(parts, fmt, rows, cols, x.contiguous(), out, torch.cuda.current_stream(x.device).cuda_stream)
        return out

    def linear(self, x: torch.Tensor, part: torch.Tensor, fmt: str, shape) -> torch.Tensor:
        """x [T, in] @ W.T for a packed dense weight (kernels/packed.py). q8/q4 at one token of
        16-bit x, up to gemv_max_elems weights: the decode GEMV (fm_gemv.cu); q8/q4/q2 otherwise:
        the fused kernel up to fused_max_tokens tokens, else dequantize + cuBLAS; llama.cpp block
        formats: our bit-exact dequantize kernel, then cuBLAS (no fused GGUF GEMV on CUDA yet);
        raw formats: torch. Every path launches on the current stream (capturable)."""
        rows, cols = int(shape[0]), int(shape[1])
        if self._gemv_takes(x, fmt, cols, rows):
            return self._gemv(x, [part], fmt, [rows], cols)
        if fmt in ("q8", "q4", "q2") and x.shape[0] <= self.fused_max_tokens and x.dtype in _ACT:
            km = self._require()
            out = torch.empty((x.shape[0], rows), dtype=x.dtype, device=x.device)
            km.linear(part, fmt, rows, cols, x.contiguous(), out, torch.cuda.current_stream(x.device).cuda_stream)
            return out
        return F.linear(x, self.dequantize(part, fmt, shape, x.dtype))

    def linear_stack(self, x: torch.Tensor, parts: list[torch.Tensor], fmt: str, shapes) -> torch.Tensor:
        """The parts stacked along their rows in one launch of the decode GEMV at 1..4 tokens (q, k
        and v of a decode step: one kernel, no copy of the weights, no cat), else per part."""
        if len(parts) == 1:
            return self.linear(x, parts[0], fmt, shapes[0])
        cols = int(shapes[0][1])
        if self._gemv_takes(x, fmt, cols) and len(parts) <= self._require().GEMV_MAX_PARTS:
            return self._gemv(x, parts, fmt, [int(s[0]) for s in shapes], cols)
        return super().linear_stack(x, parts, fmt, shapes)

    def dequantize(self, part: torch.Tensor, fmt: str, shape, dtype: torch.dtype) -> torch.Tensor:
        from ..quant_gguf import is_block_format
        rows, cols = int(shape[0]), int(shape[1])
        if is_block_format(fmt):
            from .. import _gguf_kernels_cuda as g
            return g.dequantize(part, fmt, (rows, cols)).to(dtype)
        if fmt in ("q8", "q4", "q2") and dtype in _ACT:
            out = torch.empty((rows, cols), dtype=dtype, device=part.device)
            self._require().dequant(part, fmt, rows, cols, out, torch.cuda.current_stream(part.device).cuda_stream)
            return out
        return super().dequantize(part, fmt, shape, dtype)


_ACT = (torch.float32, torch.bfloat16, torch.float16)
_ACT16 = (torch.bfloat16, torch.float16)
