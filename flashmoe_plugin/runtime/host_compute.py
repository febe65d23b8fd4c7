"""Experts computed where they lie in RAM, on the CPU cores, instead of copied to the GPU (hybrid).

Two ways a record gets here:
- dynamic (Fiddler-style, `host_compute`): a decode step's records found in the pinned host tier.
  For each step the measured costs split them: a record copied up costs one host->device copy
  (the copy engine), one computed here costs one CPU expert call, and both sides run at once,
  so the step takes max(copied x copy_s, cpu_o + computed x cpu_s); `share(m)` picks how many of
  the m host records the CPU takes to make that smallest. The costs are measured, not assumed: on
  first use one record's copy is timed with CUDA events, and the CPU's affine cost (cpu_o + n x
  cpu_s) from a call of one and a call of k host-tier records; then the real CPU calls keep a
  running average (H200, Mixtral q4: a copy 1.79 ms, the CPU 0.13 + 0.91 per record, so one
  record 1.04 and two 1.95). Modes: "auto" (the cost model; only on GPU runs with a host tier), "on" (every host
  record; also on the CPU twin, for tests), "off".
  A copy up into a full device tier is a swap: its victim comes down at the same time, and both
  transfers take the host RAM the C kernels stream, so the split prices a copy at twice copy_s
  (the static path's tuner measured a layer with one of its two experts copied at 2.18 ms against
  1.94 with both on the CPU, where copy_s alone predicted 1.80: h200-d11-call1-static24.json).
  The predictor copies a guessed host record up ahead of its layer only where copies are the
  cheaper way (`copies_ahead`). Where the CPU is, a copy up reads the record's bytes from RAM as
  the C kernels would (at PCIe's 55 GB/s, beside kernels that stream ~100 of the H200 host's
  ~130 GB/s), evicts a VRAM record that later tokens may use and writes it back to RAM, and on
  the critical path the layer waits for it. Main's copies held row 2 at 7.7 tok/s (~31 per
  token), a first version's copies within the measured time per layer at 11.5 (15 per token:
  h200-d11-call1-row2.json). `prefetch_up = True` (an A/B switch) copies up beside the CPU's
  share instead: while the CPU computes this layer's host records for at least a copy's time,
  and never behind another copy up.
"""
from __future__ import annotations

import os
import time

import torch

from .. import kernels
from ..pager.tiers import event_times
from ..timing import best_seconds


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_cpus_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def cpu_backend(device: torch.device):
    """The C kernels for host-side experts: all physical cores beside a GPU (the C pool is one per
    process; on a GPU run nothing else uses it), torch's thread count on a CPU run."""
    from ..kernels.cpu_backend import CpuBackend
    if device.type == "cpu":
        return kernels.select("cpu")
    return CpuBackend(physical_cores())


def cpu_share(m: int, copy_s: float, cpu_s: float, cpu_o: float = 0.0) -> int:
    """How many of m equal pieces of work the CPU computes while the others are copied up to the
    GPU, both at once: the n making the slower side shortest, max((m - n) copies, n on the CPU
    plus cpu_o, the CPU side's fixed host time when it has work); ties go to the CPU (one copy less)."""
    return min(range(m + 1), key=lambda n: (max((m - n) * copy_s, n * cpu_s + (cpu_o if n else 0.0)), -n))


class HostCompute:
    # beside a GPU the C pool's idle threads spin this long for the next call (microseconds): a
    # decode token's layers come ~1-2 ms apart, and the default 50 us would put them to sleep
    # between any two calls (CpuLayers.spin_us, the static path's)
    spin_us = 5000
    cpu_o = 0.0  # the CPU side's fixed time per call (a call of n records: cpu_o + n x cpu_s)
    prefetch_up = False  # True: in "auto", copies up ahead beside the CPU's share too (an A/B switch)

    def __init__(self, mode, pager, layout, device: torch.device, act=None):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"host_compute must be auto, on or off, not {mode!r}")
        self.layout, self.device = layout, device
        has_tier = pager.t1 is not None
        self.mode = mode if has_tier and (mode == "on" or device.type == "cuda") else "off"
        self.backend = cpu_backend(device) if self.mode != "off" else None
        if self.backend is not None and device.type == "cuda" and hasattr(self.backend, "set_spin_us"):
            self.backend.set_spin_us(self.spin_us)
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
        """Whether the CPU computes a lone host record faster than a copy brings it up."""
        return self.share(1) > 0

    def share(self, m: int) -> int:
        """How many of a step's m host-tier records to compute here (the rest are copied up)."""
        if self.mode != "auto":
            return m if self.mode == "on" else 0
        if self.copy_s is None:
            self._calibrate()
        return cpu_share(m, self.copy_s * self._swap(), self.cpu_s, self.cpu_o)

    def _swap(self) -> int:
        """2 where a copy up evicts a record to the host tier (the device tier is full), else 1."""
        return 2 if len(self._pager.t0) >= self._pager.capacity else 1

    def cpu_time(self, n: int) -> float:
        """The CPU's time for a call of n host records (0 for none)."""
        return self.cpu_o + n * self.cpu_s if n and self.cpu_s is not None else 0.0

    def copies_ahead(self, beside_s: float) -> int:
        """How many guessed host-tier records a prefetch may copy up while the CPU computes for
        beside_s seconds (this layer's host records). "off": all of them (copies are the only
        way up); "on": all (the CPU takes whatever is left in the host tier); "auto": all where a
        lone host record would be copied up anyway (copies are the cheaper way: ahead of time they
        hide their latency), else none; with `prefetch_up`, none while an earlier copy up is still
        on the copy engine, and otherwise those that land within beside_s."""
        if self.mode != "auto" or self.share(1) == 0:
            return 1 << 30
        if not self.prefetch_up or not self._pager.copies.up_idle():
            return 0
        return int(beside_s // self.copy_s)

    def _calibrate(self):
        p = self._pager
        src = p.staging[0]
        dst = torch.empty(p.record_size, dtype=torch.uint8, device=self.device)
        self.copy_s = min(event_times(lambda: dst.copy_(src, non_blocking=True), 3))
        self.cpu_o, self.cpu_s = self._cpu_costs()

    def _cpu_costs(self) -> tuple[float, float]:
        """(cpu_o, cpu_s) from a call of one record and a call of k, each call on host-tier rows no
        earlier call read (decode's records come from RAM; records called again would stay in the
        host's L3 and measure the CPU too fast: CpuLayers.measure_cpu)."""
        rows, k = self._pager.t1.slots, max(1, self._pager.need)
        # nonzero x: the integer-activation kernels treat all-zero groups apart; a cost measured too
        # high gives the CPU no work, and it is then never measured again to correct it
        x, turn = torch.ones(1, self.layout.hidden), [0]

        def call(n: int):
            i = turn[0]
            turn[0] += n
            self._sum(x, [rows[(i + j) % len(rows)] for j in range(n)], [1.0] * n, self.layout)
        t1 = best_seconds(lambda: call(1))
        if k == 1:
            return 0.0, t1
        tk = best_seconds(lambda: call(k))
        cpu_s = min(max((tk - t1) / (k - 1), t1 / k), t1)
        return t1 - cpu_s, cpu_s

    @staticmethod
    def to_host(x: torch.Tensor) -> torch.Tensor:
        """x in fp32 on the CPU; call it before queueing GPU work that the CPU should overlap."""
        return x.float().cpu()

    def run(self, xh: torch.Tensor, records, weights, like: torch.Tensor, layout=None) -> torch.Tensor:
        """sum_i weights[i] * expert_i(xh) on the CPU (xh from to_host), returned on `like`'s
        device and dtype (layout: the layer's record layout where it differs from the store's, as
        in a GGUF store)."""
        layout = layout or self.layout
        t0 = time.perf_counter()
        out = self._sum(xh, records, weights, layout)
        if self.cpu_s is not None and records:  # the per-record cost follows the calls (cpu_o stays)
            dt = (time.perf_counter() - t0 - self.cpu_o) / len(records)
            self.cpu_s = 0.9 * self.cpu_s + 0.1 * max(dt, 0.5 * self.cpu_s)
        return out.to(like.device, like.dtype)

    def _sum(self, xh, records, weights, layout) -> torch.Tensor:
        if self.act is None:  # one native call for SwiGLU experts
            return self.backend.moe(xh, tuple(records), tuple(float(w) for w in weights), layout)
        out = torch.zeros_like(xh)
        for rec, w in zip(records, weights):
            out.add_(self._expert(xh, rec, layout), alpha=w)
        return out
