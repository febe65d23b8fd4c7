"""Experts computed where they lie in RAM, on the CPU cores, instead of copied to the GPU (hybrid).

Two ways a record gets here:
- dynamic (Fiddler-style, `host_compute`): a decode step's records found in the pinned host tier.
  For each step the measured costs split them: a record copied up costs one host->device copy
  (the copy engine), one computed here costs one CPU expert call, and both sides run at once,
  so the step takes max(copied x copy_s, computed x cpu_s); `share(m)` picks how many of the m
  host records the CPU takes to make that smallest. The costs are measured, not assumed: on
  first use one record's copy is timed with CUDA events and one CPU expert call on a record-sized
  buffer, then the real CPU calls keep a running average. Modes: "auto" (the cost model; only
  on GPU runs with a host tier), "on" (every host record; also on the CPU twin, for tests), "off".
- static (`n_cpu_moe`, llama.cpp's --n-cpu-moe): every expert of the first N MoE layers is read
  into RAM at start, never paged, and always computed on the CPU (CpuLayers).

The GPU's work is queued first and the CPU computes while it runs: the activation is copied
to the host before the GPU kernels are launched (a copy queued after them would wait for them).
On a CUDA run the C kernels get every physical core (torch's own CPU threads idle while the GPU
computes); on a CPU run they share torch's thread count, so the two pools take turns.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .. import kernels
from ..pager.tiers import event_times


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


class HostCompute:
    def __init__(self, mode, pager, layout, device: torch.device, act=None):
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"host_compute must be auto, on or off, not {mode!r}")
        self.layout, self.device = layout, device
        has_tier = pager.t1 is not None
        self.mode = mode if has_tier and (mode == "on" or device.type == "cuda") else "off"
        self.backend = cpu_backend(device) if self.mode != "off" else None
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
        return min(range(m + 1), key=lambda n: (max((m - n) * self.copy_s, n * self.cpu_s), -n))

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
        if self.act is None:  # one native call for SwiGLU experts
            out = self.backend.moe(xh, tuple(records), tuple(float(w) for w in weights), layout)
        else:
            out = torch.zeros_like(xh)
            for rec, w in zip(records, weights):
                out.add_(self._expert(xh, rec, layout), alpha=w)
        if self.cpu_s is not None:
            dt = (time.perf_counter() - t0) / max(1, len(records))
            self.cpu_s = 0.9 * self.cpu_s + 0.1 * dt
        return out.to(like.device, like.dtype)


class CpuLayers:
    """`n_cpu_moe`: the expert records of the first N MoE layers, read into RAM at start and never
    paged. Decode computes them on the CPU. Beside a GPU, a prefill expert with t tokens is copied
    up and run there instead when t x (one token's CPU time) exceeds one record's copy time, both
    measured at start (llama.cpp likewise offloads large batches): the CPU streams the record once
    per token group it can hold, the GPU's tensor cores take any number of tokens for one copy."""

    def __init__(self, store, n: int, device: torch.device, io_threads: int = 4, verify: bool = True,
                 gpu_backend=None):
        from ..io import Reader, aligned_empty
        order = sorted(store.layers)
        if not 0 <= n <= len(order):
            raise ValueError(f"n_cpu_moe={n}: the store has {len(order)} MoE layers")
        self.layers = order[:n]
        self._set = set(self.layers)
        self.layouts = {layer: store.layout_of(layer) for layer in self.layers}
        self.layout, size = store.layout, store.layout.size
        self.backend = cpu_backend(device)
        count = sum(store.layers[l].experts for l in self.layers)
        self.bytes = count * size
        self.mem = aligned_empty(self.bytes) if count else None
        self.device, self.gpu = device, gpu_backend if device.type == "cuda" else None
        self._pinned = None
        if self.gpu is not None and count:  # pinned: copies up run at full PCIe speed
            from ..pager.tiers import CudaCopies
            self._pinned = CudaCopies(device)
            self.mem = self._pinned.host_memory(self.bytes)
        self.records: dict = {}
        at = 0
        with Reader(nthreads=io_threads, direct=False) as reader:
            fids: dict = {}
            for layer in self.layers:
                jobs = []
                for e in range(store.layers[layer].experts):
                    rec = self.mem[at:at + size]
                    for f, off, nbytes, into, crc in store.record_reads(layer, e, verify):
                        if f not in fids:
                            fids[f] = reader.open(str(f))
                        jobs.append((fids[f], off, nbytes, rec[into:into + nbytes], crc))
                    self.records[(layer, e)] = rec
                    at += size
                try:
                    reader.read(jobs)
                except OSError as err:
                    from ..store.format import StoreError
                    raise StoreError(f"{store.layer_path(layer)}: layer {layer}: {err}") from err
        self.cpu_s = self.copy_s = None
        self.slot = None
        self.copied_up = 0  # prefill experts run on the GPU (for bench and tests)
        if self.gpu is not None and count:
            rec = next(iter(self.records.values()))
            self.slot = torch.empty(size, dtype=torch.uint8, device=device)
            self.copy_s = min(event_times(lambda: self.slot.copy_(rec, non_blocking=True), 3))
            lay = self.layouts[self.layers[0]]
            x = torch.zeros(1, lay.hidden)
            self.backend.expert_ffn(x, rec, lay)  # warm
            t0 = time.perf_counter()
            self.backend.expert_ffn(x, rec, lay)
            self.cpu_s = time.perf_counter() - t0

    def close(self):
        if self._pinned is not None:
            self._pinned.close()  # unpins the records
            self._pinned = None
        self.records.clear()
        self.mem = self.slot = None

    def __contains__(self, layer: int) -> bool:
        return layer in self._set

    @staticmethod
    def _ffn(backend, x, rec, layout, act):
        return backend.expert_ffn(x, rec, layout) if act is None else backend.expert_general(x, rec, layout, act)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, act=None) -> torch.Tensor:
        """The routed experts of `layer` for x [T, H] (any device), computed on the CPU (act: the
        family's activation where it is not SwiGLU, as Engine gets it from the model)."""
        lay = self.layouts[layer]
        if x.shape[0] == 1 and act is None:  # decode: one copy to the host, one native call
            k, H = ids.shape[1], x.shape[1]
            packed = torch.cat((x.float().view(-1), weights.float().view(-1), ids.float().view(-1))).cpu()
            chosen = [int(e) for e in packed[H + k:].tolist()]  # ids < 2^24: exact in fp32
            out = self.backend.moe(packed[:H].view(1, H), tuple(self.records[(layer, e)] for e in chosen),
                                   tuple(packed[H:H + k].tolist()), lay)
            return out.to(x.device, x.dtype)
        xh = x.float().cpu()
        ids_h, w_h = ids.cpu(), weights.float().cpu()
        out = torch.zeros_like(xh)
        gpu_out = torch.zeros_like(x) if self.gpu is not None else None
        for e in np.unique(ids_h.numpy()).tolist():
            tok, slot = torch.where(ids_h == e)
            rec = self.records[(layer, e)]
            if gpu_out is not None and len(tok) * self.cpu_s > self.copy_s:
                self.slot.copy_(rec, non_blocking=True)  # stream-ordered after the last expert's use
                tg, sg = tok.to(x.device), slot.to(x.device)
                y = self._ffn(self.gpu, x[tg], self.slot, lay, act) * weights[tg, sg, None]
                gpu_out.index_add_(0, tg, y.to(x.dtype))
                self.copied_up += 1
                continue
            y = self._ffn(self.backend, xh[tok], rec, lay, act) * w_h[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out.to(x.device, x.dtype)
        return out if gpu_out is None else out + gpu_out
