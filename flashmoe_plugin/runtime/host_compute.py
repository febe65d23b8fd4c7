"""Fiddler-style CPU compute of experts that sit in the pinned host tier: for one decode token,
multiplying a record where it lies can beat copying it to the GPU first (a 99 MB Mixtral q4
record takes ~1.8 ms over PCIe at 55 GB/s; a many-core CPU streams it through our q4 kernel in
about as long, and the copy engine stays free for disk misses).

The cost model is measured, not assumed: on first use it times one record's host->device copy
(CUDA events) and one CPU expert call on a record-sized buffer, then keeps an average of the real
CPU calls. `pays()` says whether the CPU is the cheaper way. Modes: "auto" (the cost model; only
on GPU runs with a host tier), "on" (always; also on the CPU twin, for tests), "off".
"""
from __future__ import annotations

import time

import torch

from .. import kernels
from ..pager.tiers import event_times


class HostCompute:
    def __init__(self, mode, pager, layout, device: torch.device, act=None):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"host_compute must be auto, on or off, not {mode!r}")
        self.layout, self.device = layout, device
        has_tier = pager.t1 is not None
        self.mode = mode if has_tier and (mode == "on" or device.type == "cuda") else "off"
        self.backend = kernels.select("cpu") if self.mode != "off" else None
        self.cpu_s: float | None = None
        self.copy_s: float | None = None
        self._pager = pager
        self.act = act  # None: plain SwiGLU; else the family's activation (Backend.expert_general)

    def _expert(self, x, rec, layout=None):
        layout = layout or self.layout
        if self.act is None:
            return self.backend.expert_ffn(x, rec, layout)
        return self.backend.expert_general(x, rec, layout, self.act)

    def pays(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        if self.copy_s is None:
            self._calibrate()
        return self.cpu_s < self.copy_s

    def _calibrate(self):
        p = self._pager
        src = p.staging[0]
        dst = torch.empty(p.record_size, dtype=torch.uint8, device=self.device)
        self.copy_s = min(event_times(lambda: dst.copy_(src, non_blocking=True), 3))
        x, rec = torch.zeros(1, self.layout.hidden), torch.zeros_like(src)
        self._expert(x, rec)  # warm
        t0 = time.perf_counter()
        self._expert(x, rec)
        self.cpu_s = time.perf_counter() - t0

    def run(self, x: torch.Tensor, records, weights, layout=None) -> torch.Tensor:
        """sum_i weights[i] * expert_i(x) on the CPU, returned on x's device and dtype (layout:
        the layer's record layout where it differs from the store's, as in a GGUF store)."""
        layout = layout or self.layout
        t0 = time.perf_counter()
        xh = x.float().cpu()
        out = torch.zeros_like(xh)
        for rec, w in zip(records, weights):
            out.add_(self._expert(xh, rec, layout), alpha=w)
        if self.cpu_s is not None:
            dt = (time.perf_counter() - t0) / max(1, len(records))
            self.cpu_s = 0.9 * self.cpu_s + 0.1 * dt
        return out.to(x.device, x.dtype)
