"""The interface every kernel backend implements (torch reference, native cpu, native cuda).

Records arrive as uint8 tensors laid out by store.layout.RecordLayout; activations are float
tensors on the backend's device. A backend computes the SwiGLU expert
    y = w2 · (silu(w1 · x) * (w3 · x))
with w1/w3 the two halves of the fused `w13` part.
"""
from __future__ import annotations

import torch


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
        for rec, w in zip(records, weights.tolist()):
            out.add_(self.expert_ffn(x, rec, layout), alpha=w)
        return out
