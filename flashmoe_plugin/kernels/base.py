"""The interface every kernel backend implements (torch reference, native cpu, native cuda).

Records arrive as uint8 tensors laid out by store.layout.RecordLayout; activations are float
tensors on the backend's device. A backend computes the SwiGLU expert
    y = w2 · (silu(w1 · x) * (w3 · x))
with w1/w3 the two halves of the fused `w13` part. Experts of another shape (gpt-oss: biases and
a clamped activation) go through `expert_general`: the backend's dequantizing products, with the
activation and the biases applied in torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import quant


class Backend:
    name: str = "?"
    devices: tuple[str, ...] = ("cpu",)
    priority: int = 0  # higher wins when the engine picks the best available for its device

    def available(self) -> tuple[bool, str]:
        """(usable here?, why not)."""
        return True, ""

    def expert_ffn(self, x: torch.Tensor, record: torch.Tensor, layout) -> torch.Tensor:
        """x [T, H] -> [T, H] for one expert record (prefill: T tokens; decode: T = 1)."""
        raise NotImplementedError

    def moe_decode(self, x: torch.Tensor, records: list[torch.Tensor], weights: torch.Tensor, layout) -> torch.Tensor:
        """One token through k experts: sum_i weights[i] * expert_i(x). x [1, H] -> [1, H].
        Native backends override this with a single fused call."""
        out = torch.zeros_like(x)
        for rec, w in zip(records, weights.tolist() if isinstance(weights, torch.Tensor) else weights):
            out.add_(self.expert_ffn(x, rec, layout), alpha=w)
        return out

    def grouped_ffn(self, x: torch.Tensor, records: list[torch.Tensor], counts, layout,
                    most: int | None = None) -> torch.Tensor:
        """Prefill through several experts at once: x [sum(counts), H] holds the tokens grouped per
        expert (counts[i] rows for records[i], in order) -> [sum(counts), H]. counts: a list, or a
        tensor on x's device (then nothing need be read back: `most` bounds each count). Here one
        expert_ffn per non-empty group; the CUDA backend overrides it with one launch for all
        (csrc/cuda/fm_prefill.cu)."""
        if isinstance(counts, torch.Tensor):
            counts = counts.tolist()
        outs, at = [], 0
        for rec, c in zip(records, counts):
            if c:
                outs.append(self.expert_ffn(x[at:at + c], rec, layout))
            at += c
        return torch.cat(outs) if len(outs) > 1 else outs[0] if outs else x[:0].clone()

    def linear(self, x: torch.Tensor, part: torch.Tensor, fmt: str, shape) -> torch.Tensor:
        """x [T, in] @ W.T for one weight part of format fmt and shape [out, in]. Native backends
        override this with a fused dequantizing product."""
        return F.linear(x, quant.dequantize(part, fmt, shape, x.dtype))

    def linear_stack(self, x: torch.Tensor, parts: list[torch.Tensor], fmt: str, shapes) -> torch.Tensor:
        """x [T, in] @ [W_0; W_1; ...].T for weight parts of one format stacked along their rows
        (q, k and v): [T, sum of outs]. Here one linear per part, concatenated; the CUDA backend
        overrides it with one launch over the parts where they lie."""
        return torch.cat([self.linear(x, p, fmt, s) for p, s in zip(parts, shapes)], dim=-1)

    def dequantize(self, part: torch.Tensor, fmt: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """The float matrix [out, in] of one weight part, on the part's device (packed embeddings)."""
        return quant.dequantize(part, fmt, shape, dtype)

    def expert_general(self, x: torch.Tensor, record: torch.Tensor, layout, act) -> torch.Tensor:
        """x [T, H] -> [T, H] for an expert with optional biases (b13, b2) and the activation
        act: [T, 2I] -> [T, I]."""
        def part(name, v):
            p = layout.part(name)
            return self.linear(v, layout.part_bytes(record, name), p.format, p.shape)

        def bias(name):
            if not layout.has(name):
                return 0
            p = layout.part(name)
            return quant.dequantize(layout.part_bytes(record, name), p.format, p.shape, x.dtype)[0]
        return part("w2", act(part("w13", x) + bias("b13"))) + bias("b2")
