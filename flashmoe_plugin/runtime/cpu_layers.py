"""`n_cpu_moe` (llama.cpp's --n-cpu-moe): every expert of the first N MoE layers read into RAM at
start, never paged, and computed on the CPU cores, or shared with the GPU by measured costs
(runtime/host_compute.py has the dynamic tiers' host compute and the cost split both use).
"""
from __future__ import annotations

import os
import time

import torch

from ..pager.tiers import event_times
from ..store.slices import cut, slice_count, slice_layout
from ..timing import best_seconds
from .host_compute import cpu_backend, cpu_share
from .split_tuner import SplitTuner


class CpuLayers:
    """`n_cpu_moe`: the expert records of the first N MoE layers, read into RAM (pinned beside a
    GPU) at start and never paged.

    Decode: a token's k experts of such a layer are shared between the CPU (the C kernels on every
    physical core) and the GPU (copied over PCIe into a small ring of VRAM slots, then the fused
    kernel), both at once, or all on the CPU where that is faster (on the H200 machine the C
    kernels stream a token's two Mixtral experts at ~124 GB/s, and the copy engine reads the same
    RAM). `plan(k, q)` gives the CPU the first c of the token's k*q slices (whole experts, then the
    head of the next one) and the GPU the rest (that expert's tail, one copy, and the later
    experts), c making the slower side shortest by measured costs (without a GPU: all on the CPU);
    beside a CUDA GPU c is chosen by decode's own measured time per CPU layer instead
    (runtime/split_tuner.py). q = 1 (whole experts) unless FLASHMOE_SLICE_EXPERTS=1: then, once the
    GPU side is attached, each record is re-laid out as q slices along its intermediate dimension
    (store/slices.py: q records of I/q rows, summing to the expert; 8 per Mixtral expert), so c
    moves by an eighth of an expert. Opt-in: on the H200 the C kernels took ~8% longer over a
    token's sixteen slices than over its two whole experts (1.75 against 1.59-1.64 ms per layer,
    one process, results/h200-lead-s8-sweep.json), and the tuner kept every slice on the CPU.
    Prefill: an expert with t tokens is copied up and run on the GPU when cpu_o + t x cpu_s (its
    CPU time, priced as a decode call of t experts) exceeds one record's copy time (llama.cpp likewise offloads large batches): the CPU
    streams the record once per token group it can hold, the GPU's tensor cores take any number
    of tokens for one copy. The copies run on their own stream, several slots ahead of the
    compute (and into the next CPU layer's first experts), so PCIe and the GPU work at once."""

    cpu_o = 0.0  # the CPU side's fixed time per decode call: the C call's (cpu_o + n x cpu_s) and the host's
    _call_o = _host_o = 0.0  # its two parts (beside a GPU, measured)
    # [fixed, per expert, host] of a call with every expert on the CPU, kept apart (beside a GPU):
    # beside the copies the CPU is slower (both read RAM), and that must not price the CPU alone
    alone: list | None = None
    # beside a GPU the C pool's idle threads spin this long for the next call (microseconds): a decode
    # token's CPU layers come ~0.5 ms apart, and the VRAM layers and the head between two tokens
    # take a few ms; the default 50 us would put them to sleep between any two calls
    spin_us = 5000
    _issued = 0.0  # perf_counter when the last decode's copies were queued
    tune = True  # beside a GPU: the decode share by measured time (SplitTuner); False: by the cost model (A/B)

    def __init__(self, store, n: int, device: torch.device, io_threads: int = 4, verify: bool = True,
                 gpu_backend=None):
        from ..io import Reader
        from ..pager.tiers import CudaCopies, HostCopies
        order = sorted(store.layers)
        if not 0 <= n <= len(order):
            raise ValueError(f"n_cpu_moe={n}: the store has {len(order)} MoE layers")
        self.layers = order[:n]
        self._set = set(self.layers)
        self._next_layer = {a: b for a, b in zip(self.layers, self.layers[1:])}
        self.layouts = {layer: store.layout_of(layer) for layer in self.layers}
        self.experts = {layer: store.layers[layer].experts for layer in self.layers}
        self.layout, size = store.layout, store.layout.size
        self.k = store.config.top_k
        count = sum(store.layers[l].experts for l in self.layers)
        cuda = device.type == "cuda" and gpu_backend is not None and count > 0
        # slices per expert once a GPU side is attached (records stay whole until then): only with
        # FLASHMOE_SLICE_EXPERTS=1 (the class docstring says why)
        sliced = os.environ.get("FLASHMOE_SLICE_EXPERTS", "0") == "1"
        self._q = {layer: slice_count(lay, self.k) if sliced else 1 for layer, lay in self.layouts.items()}
        self.cut = {layer: (1, lay) for layer, lay in self.layouts.items()}  # (q, slice layout) in use
        # a record's room in RAM and in a ring slot: whole, or its q slices (each page-aligned)
        self.stride = max([size] + [q * slice_layout(self.layouts[l], q).size for l, q in self._q.items()])
        self.backend = cpu_backend(device)
        self.bytes = count * self.stride
        self.device, self.gpu = device, None
        self.copies = CudaCopies(device) if cuda else HostCopies()  # pinned: copies up at full PCIe speed
        # in huge pages: decode streams these records through the C kernels (~124 GB/s on the H200),
        # and with 4 KiB pages every 4 KiB of them is a TLB miss (two page walks in a VM)
        self.mem = self.copies.host_memory(self.bytes, huge=True) if count else None
        self.records: dict = {}
        at = 0
        with Reader(nthreads=io_threads, direct=False) as reader:
            fids: dict = {}
            for layer in self.layers:
                jobs = []
                for e in range(store.layers[layer].experts):
                    rec = self.mem[at:at + self.stride]
                    for f, off, nbytes, into, crc in store.record_reads(layer, e, verify):
                        if f not in fids:
                            fids[f] = reader.open(str(f))
                        jobs.append((fids[f], off, nbytes, rec[into:into + nbytes], crc))
                    self.records[(layer, e)] = rec
                    at += self.stride
                try:
                    reader.read(jobs)
                except OSError as err:
                    from ..store.format import StoreError
                    raise StoreError(f"{store.layer_path(layer)}: layer {layer}: {err}") from err
        self.cpu_s = self.copy_s = None
        self.slots, self._ahead, self._busy = None, {}, set()
        self.copied_up = 0     # prefill experts run on the GPU (for bench and tests)
        self.split_up = 0      # decode experts (whole or their tail slices) run on the GPU (bench, tests)
        self.cut_s = 0.0       # seconds spent slicing the records (once, at attach)
        self._host_out = torch.zeros(1, store.layout.hidden)
        self._adapt = cuda  # the costs follow the decode's own calls (the twin keeps the costs it is given)
        # beside a GPU the decode share is chosen by measured time per CPU layer (runtime/split_tuner.py;
        # it needs two CPU layers in a row); None: by the cost model (the twin, unless a test sets one)
        self.tuners: dict | None = {} if cuda and self.tune and len(self.layers) > 1 else None
        self._last = None  # (layer, share, perf_counter) of the last decode call, for the tuner
        self._dev_out = None  # the CPU's sum on the device in fp32 (beside a GPU)
        self._views: dict = {}  # cached tensor views of records and ring slots (decode makes none per call)
        self._native: dict = {}  # layer -> the C kernels' spec of its slice layout, or None (another format)
        self._decoded = False  # decode's copies ran on the compute stream since the ring's last fence
        self._timer, self._timed = None, 0.0  # CUDA events around the last decode's copies, records copied
        if cuda:
            if hasattr(self.backend, "set_spin_us"):
                self.backend.set_spin_us(self.spin_us)
            self._host_out = self._host_out.pin_memory()
            self._dev_out = torch.empty(1, store.layout.hidden, device=device)
            self._timer = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ring = torch.empty(self.ring_size() * self.stride, dtype=torch.uint8, device=device)
            self.attach(gpu_backend, ring)
            layer = self.layers[0]
            q, lay = self.cut[layer]
            rec = self.records[(layer, 0)]
            self.copy_s = min(event_times(lambda: self.slots[0][:q * lay.size].copy_(rec[:q * lay.size], non_blocking=True), 3))
            self.measure_cpu()

    def measure_cpu(self):
        """cpu_s and cpu_o, the CPU's cost being affine in a call's experts (cpu_o + n x cpu_s): one
        call of one expert and one of a token's k (nonzero x, as HostCompute's). On the H200
        (Mixtral, 16 cores) one expert took ~1.1 ms and two ~1.6: a cost per expert from one-expert
        calls put a token's two experts at 2.2 ms, and the plan split them where the CPU alone was
        faster than any split. Each timed call reads records no earlier call read (decode's do: a
        token's experts of one layer come from RAM): the same records called again stayed in the
        H200 host's 300 MiB L3 (one Mixtral expert 0.48 ms there, 0.8 from RAM in decode), and the
        cost model then put everything on the CPU (h200-h10d-sweep.json)."""
        layer = self.layers[0]
        q, lay = self.cut[layer]
        x = torch.ones(1, lay.hidden)
        keys = [(l, e) for l in self.layers if self.cut[l] == (q, lay) for e in range(self.experts[l])]
        keys = keys[:4 * (1 + self.k)]  # best_seconds' four calls of one, then of k records
        order = [self._pieces(self.records[key], key[0], 0, q) for key in keys]
        turn = [0]

        def call(n: int):
            i = turn[0]
            turn[0] += n
            recs = sum((order[(i + j) % len(order)] for j in range(n)), [])
            self.backend.moe(x, recs, [1.0] * len(recs), lay)
        t1 = best_seconds(lambda: call(1))
        tk = best_seconds(lambda: call(self.k))
        self.cpu_s = min(max((tk - t1) / (self.k - 1), t1 / self.k), t1) if self.k > 1 else t1
        self._call_o = self.cpu_o = t1 - self.cpu_s
        self._host_o = 0.0
        self.alone = [self.cpu_o, self.cpu_s, 0.0]

    def ring_size(self) -> int:
        """VRAM slots for records on their way up: a token's k twice over (a layer's copies land
        while the previous layer's kernels still read theirs), at least 4 (prefill's copies ahead)."""
        return max(4, 2 * self.k)

    def attach(self, gpu_backend, ring: torch.Tensor, copy_s=None, cpu_s=None, cpu_o=0.0):
        """The GPU side: its kernel backend and the ring of record slots (device memory, ring_size()
        x stride bytes; the CPU twin passes the CPU backend and host memory, with costs of its
        choosing). The records are cut into their slices here, once."""
        self.gpu = gpu_backend
        self.slots = ring[:self.ring_size() * self.stride].view(self.ring_size(), self.stride)
        self._fence = [None] * self.ring_size()  # compute-stream event of each slot's last reader
        self._lru = list(range(self.ring_size()))  # slots, least recently taken first
        self._busy: set = set()  # slots whose copy is queued and whose kernels are not yet
        self._ahead: dict = {}  # (layer, expert) -> (slot, copy event): copied before asked for
        if copy_s is not None:
            self.copy_s, self.cpu_s, self.cpu_o, self.alone = copy_s, cpu_s, cpu_o, None
        t0 = time.perf_counter()
        for layer in self.layers:
            q, lay = self._q[layer], self.layouts[layer]
            if self.cut[layer][0] == q:
                continue
            tmp = torch.empty(lay.size, dtype=torch.uint8)
            for e in range(self.experts[layer]):
                rec = self.records[(layer, e)]
                tmp.copy_(rec[:lay.size])
                cut(tmp, lay, q, rec)
            self.cut[layer] = (q, slice_layout(lay, q))
        self.cut_s += time.perf_counter() - t0
        self._views.clear()
        self._native.clear()

    def close(self):
        self.copies.close()  # unpins the records
        self.records.clear()
        self.mem = self.slots = None
        self._ahead = {}

    def __contains__(self, layer: int) -> bool:
        return layer in self._set

    def _pieces(self, base: torch.Tensor, layer: int, lo: int, hi: int) -> list:
        """Slices lo..hi-1 of an expert held at `base` (its record in RAM, or the ring slot it was
        copied into), each a record of the layer's slice layout."""
        q, lay = self.cut[layer]
        return [base[j * lay.size:(j + 1) * lay.size] for j in range(lo, hi)]

    def _expert(self, backend, x, base, layer: int, act):
        """One expert (every slice of it) from `base`, for x [T, H] on the backend's device."""
        q, lay = self.cut[layer]
        if q == 1:
            return backend.expert_ffn(x, base, lay) if act is None else backend.expert_general(x, base, lay, act)
        pieces = self._pieces(base, layer, 0, q)
        if act is None and hasattr(backend, "moe"):  # the C kernels: the slices in one call
            return backend.moe(x, pieces, [1.0] * q, lay)
        y = None
        for p in pieces:
            o = backend.expert_ffn(x, p, lay) if act is None else backend.expert_general(x, p, lay, act)
            y = o if y is None else y.add_(o)
        return y

    # ------------------------------------------------------------------ copies up (the ring)
    def _up(self, layer: int, e: int, lo: int = 0):
        """Queue the copy of one expert's slices lo.. (its tail; lo = 0: all of it) into the least
        recently used ring slot that no queued kernel still waits to read, at their offsets in the
        record (the copy also waits for that slot's last reader): (slot, copy event). A slot is
        busy from here until `_used`."""
        ahead = self._ahead.pop((layer, e), None)
        if ahead is not None:  # the whole record is up already
            return ahead
        s = next(s for s in self._lru if s not in self._busy)
        self._lru.remove(s)
        self._lru.append(s)
        self._busy.add(s)
        q, lay = self.cut[layer]
        a, b = lo * lay.size, q * lay.size
        return s, self.copies.copy(self.slots[s][a:b], self.records[(layer, e)][a:b], after=(self._fence[s],))

    def _used(self, s: int):
        """The kernels reading slot s are queued: a later copy into it waits for them."""
        self._fence[s] = self.copies.fence()
        self._busy.discard(s)

    def _keep_ahead(self, layer: int, wanted):
        """Drop the copies made ahead that this layer does not want (their slots are free again)."""
        for key in [key for key in self._ahead if key[0] != layer or key[1] not in wanted]:
            self._busy.discard(self._ahead.pop(key)[0])

    def _copy_ahead(self, layer: int, experts):
        """Start copying records a coming layer will most likely ask for (prefill: all its experts),
        leaving one slot free for the current work."""
        for e in experts:
            if len(self._busy) >= len(self.slots) - 1:
                return
            if (layer, e) not in self._ahead:
                self._ahead[(layer, e)] = self._up(layer, e)

    def plan(self, k: int, q: int = 1) -> int:
        """How many of a decode token's k*q slices (q per expert) the CPU computes: the first c in
        routing order (c // q experts whole, then the head of the next); the GPU takes the rest,
        copied up. c makes the slower side shortest by the measured costs (copy_s per record, the
        CPU's cpu_o + n x cpu_s for n experts, a slice costing 1/q of an expert; beside a GPU they
        follow the decode's own calls, the CPU and the copies sharing RAM); ties go to the CPU (one
        copy less). The CPU alone (every expert here) is priced by its own costs (`alone`), measured
        in calls without a copy beside them: a split's measured contention would make the CPU
        alone look slower than it is, and a split chosen once would stay. Without a GPU: all here.
        On the H200 (Mixtral, k = 2, 16 cores) both experts stay on the CPU (~1.6 ms against a 1.8 ms
        copy; benchmarks/results/h200-h10c-hybrid-12l.json), where on the 32-layer rows the split 1/1
        was faster: beside a CUDA GPU decode uses SplitTuner's measured choice instead of this."""
        if self.gpu is None:
            return k * q
        c = cpu_share(k * q, self.copy_s / q, self.cpu_s / q, self.cpu_o)
        if self.alone is None or c == k * q:
            return c
        fixed, per, host = self.alone  # every expert here: the CPU's costs without a copy beside it
        split = max((k * q - c) * self.copy_s / q, self.cpu_o + c * self.cpu_s / q if c else 0.0)
        return k * q if fixed + host + k * per <= split else c

    def _tuned(self, layer: int, top: int, now: float) -> int:
        """The tuner's share for this decode call, after it got the time of the previous call
        when that was the CPU layer just before this one (the same token)."""
        tuner = self.tuner_of(top)
        last = self._last
        if last is not None and self._next_layer.get(last[0]) == layer:
            self.tuners[last[1]].record(last[2], now - last[3])
        self._last = (layer, top, tuner.c, now)
        return tuner.c

    def tuner_of(self, top: int) -> SplitTuner:
        """The decode split's tuner for calls of `top` slices (made on first use)."""
        tuner = self.tuners.get(top)
        if tuner is None:
            tuner = self.tuners[top] = SplitTuner(top, warmup=len(self.layers))
        return tuner

    def plan_of(self, k: int) -> dict:
        """The decode plan of the first CPU layer, for bench (beside a GPU: the tuner's best share
        and its measured ms per CPU layer by share)."""
        q = self.cut[self.layers[0]][0] if self.layers else 1
        tuner = (self.tuners or {}).get(k * q)
        if tuner is not None:
            return {"slices_per_expert": q, "slices_on_cpu": tuner.best, "of": k * q, "tuner": tuner.report()}
        return {"slices_per_expert": q, "slices_on_cpu": self.plan(k, q), "of": k * q}

    # ------------------------------------------------------------------ compute
    def decode(self, layer: int, xh: torch.Tensor, chosen: list[int], weights: list[float], x: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One token's routed experts of `layer` (SwiGLU) by plan(k, q): xh [1, H] fp32 on the host,
        x the same activation on the compute device. The GPU's share is queued first (its copies,
        then its kernel), then the CPU computes its share meanwhile; the sum lands in `out` (or a new
        tensor) on x's device and dtype. Beside a GPU the costs follow these calls: the C call's
        (cpu_o + n x cpu_s, both scaled by the time it took), the host's time on the CPU side beyond
        it (from the copies' issue to the sum's way up, into cpu_o) and copy_s, the copies' time on
        the device (CUDA events): all measured while the CPU and the copy engine read RAM together."""
        t_in = time.perf_counter()
        q, lay = self.cut[layer]
        k = len(chosen)
        c = self.plan(k, q) if self.tuners is None else self._tuned(layer, k * q, t_in)
        n, m = divmod(c, q)  # n experts whole here, then m slices of expert n
        gpu_out = self._gpu_share(layer, chosen, weights, n, m, x) if c < k * q else None
        if c == 0:
            return gpu_out if out is None else out.copy_(gpu_out)
        # pinned: the copy up to `out` is asynchronous; the next call reuses it only after the
        # host has waited for later work on the same stream (the next layer's routing)
        host = self._host_out
        recs, ws = [], []
        for i in range(n + bool(m)):
            hi = q if i < n else m
            recs += self._view("rec", layer, chosen[i], 0, hi)
            ws += [float(weights[i])] * hi
        spec = self._native.get(layer, False)
        if spec is False:
            spec = self._native[layer] = self.backend.spec(lay) if _native_cpu(self.backend, lay) else None
        t0 = time.perf_counter()
        if spec is not None:
            host.zero_()
            self.backend.module.moe(xh, recs, ws, spec, host)  # adds into host
        else:
            host.copy_(self.backend.moe(xh, recs, ws, lay))
        t1 = time.perf_counter()
        if out is None:
            out = torch.empty_like(x)
        if self._dev_out is not None and x.is_cuda:
            # fp32 from pinned memory, added to the GPU's share and converted on the device in one
            # kernel: torch would convert a bf16 `out`'s copy on the CPU into pageable memory
            up = self._dev_out.copy_(host, non_blocking=True)
            out = out.copy_(up) if gpu_out is None else torch.add(gpu_out, up, out=out)
        else:
            out.copy_(host)
            if gpu_out is not None:
                out.add_(gpu_out)
        if self._adapt:  # both terms of the C call's cost scaled by what it took, plus the host's own time
            kt = t1 - t0
            if gpu_out is None and self.alone is not None:  # every expert here: the costs alone
                a = self.alone
                f = 1.0 + 0.1 * (kt / max(1e-9, a[0] + a[1] * len(recs) / q) - 1.0)
                a[0], a[1] = a[0] * f, a[1] * f
                a[2] = 0.9 * a[2] + 0.1 * max(0.0, time.perf_counter() - t_in - kt)
            else:  # beside the copies
                f = 1.0 + 0.1 * (kt / max(1e-9, self._call_o + self.cpu_s * len(recs) / q) - 1.0)
                self._call_o, self.cpu_s = self._call_o * f, self.cpu_s * f
                host = time.perf_counter() - (self._issued if gpu_out is not None else t_in) - kt
                self._host_o = 0.9 * self._host_o + 0.1 * max(0.0, host)
                self.cpu_o = self._call_o + self._host_o
        return out

    def _view(self, kind: str, layer: int, key: int, lo: int, hi: int | None = None):
        """Cached views: ("rec", layer, e, lo, hi) slices lo..hi-1 of expert e's record in RAM, each
        a record of the layer's slice layout; ("slot", layer, s, lo, hi) the same in ring slot s;
        hi None: the bytes of slices lo.. as one tensor (a copy's source or destination)."""
        v = self._views.get((kind, layer, key, lo, hi))
        if v is None:
            base = self.records[(layer, key)] if kind == "rec" else self.slots[key]
            q, lay = self.cut[layer]
            v = base[lo * lay.size:q * lay.size] if hi is None else self._pieces(base, layer, lo, hi)
            self._views[(kind, layer, key, lo, hi)] = v
        return v

    def _gpu_share(self, layer: int, chosen, weights, n: int, m: int, x: torch.Tensor) -> torch.Tensor:
        """Queue the GPU's share of a decode token: expert n's slices from m on and the later experts,
        copied into ring slots 0.. on the compute stream (the host has just waited for it, so the
        copies start at once; no events, and the next copy into a slot is ordered after the
        kernel reading it), then its kernel; returns the kernel's output."""
        q, lay = self.cut[layer]
        if self._ahead:  # prefill's copies ahead: the compute stream waits for them, their slots are free
            for s, ev in self._ahead.values():
                self.copies.use(ev)
                self._busy.discard(s)
            self._ahead.clear()
        # the copies timed with events for the cost model (the tuner needs none: three event calls fewer
        # on the CPU's side of every split; copy_s keeps its start-up figure for prefill's choice)
        timer = self._timer if self._adapt and self.tuners is None else None
        if timer is not None:
            if self._timed and timer[1].query():  # the previous call's copies, long done
                dt = timer[0].elapsed_time(timer[1]) / 1e3 / self._timed
                self.copy_s = 0.9 * self.copy_s + 0.1 * dt
            timer[0].record()
        recs, ws = [], []
        for s, i in enumerate(range(n, len(chosen))):
            lo = m if i == n else 0
            self._view("slot", layer, s, lo).copy_(self._view("rec", layer, chosen[i], lo), non_blocking=True)
            recs += self._view("slot", layer, s, lo, q)
            ws += [float(weights[i])] * (q - lo)
        self._issued = time.perf_counter()
        if timer is not None:
            timer[1].record()
            self._timed = len(recs) / q
        self._decoded = True
        self.split_up += len(chosen) - n
        return self.gpu.moe_decode(x, recs, ws, lay)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, act=None) -> torch.Tensor:
        """The routed experts of `layer` for x [T, H] (any device), computed on the CPU and, beside
        a GPU, partly there (act: the family's activation where it is not SwiGLU, as Engine gets it
        from the model)."""
        if x.shape[0] == 1 and act is None:  # decode: one copy to the host, the split, one native call
            k, H = ids.shape[1], x.shape[1]
            packed = torch.cat((x.float().view(-1), weights.float().view(-1), ids.float().view(-1))).cpu()
            chosen = [int(e) for e in packed[H + k:].tolist()]  # ids < 2^24: exact in fp32
            return self.decode(layer, packed[:H].view(1, H), chosen, packed[H:H + k].tolist(), x)
        # tokens grouped per expert with one read-back per layer (a stable sort keeps each
        # expert's (token, slot) pairs in order)
        k = ids.shape[1]
        order = torch.sort(ids.reshape(-1), stable=True).indices
        counts = torch.bincount(ids.reshape(-1)).tolist()
        start = [0]
        for c in counts:
            start.append(start[-1] + c)
        used = [e for e, c in enumerate(counts) if c]
        on_gpu = [e for e in used if self.gpu is not None and self.cpu_o + counts[e] * self.cpu_s > self.copy_s]
        on_cpu = [e for e in used if e not in on_gpu]
        out = torch.zeros_like(x)
        if self._decoded and on_gpu:  # decode's copies and kernels ran on the compute stream: the ring's
            fence = self.copies.fence()  # next copies (the copy stream) wait for them
            self._fence = [fence] * len(self._fence)
            self._decoded = False
        if self._ahead:
            self._keep_ahead(layer, on_gpu)
        # the GPU's experts first, their copies queued up to the ring's size less one ahead of their
        # compute (a slot is taken again only once the kernels reading it are queued)
        depth = len(self.slots) - 1 if on_gpu else 0
        queued = {e: self._up(layer, e) for e in on_gpu[:depth]}
        for i, e in enumerate(on_gpu):
            s, ev = queued.pop(e)
            self.copies.use(ev)
            pick = order[start[e]:start[e + 1]]
            tok, slot = pick // k, pick % k
            y = self._expert(self.gpu, x[tok], self.slots[s], layer, act) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(x.dtype))
            self._used(s)
            self.copied_up += 1
            if i + depth < len(on_gpu):
                queued[on_gpu[i + depth]] = self._up(layer, on_gpu[i + depth])
        nxt = self._next_layer.get(layer)
        if on_gpu and nxt is not None:  # the next CPU layer's copies start during this one's tail
            self._copy_ahead(nxt, range(self.experts[nxt]))
        if on_cpu:  # meanwhile the CPU computes the experts with few tokens
            xh, w_h = x.float().cpu(), weights.float().cpu()
            order_h = order.cpu()
            acc = torch.zeros_like(xh)
            for e in on_cpu:
                pick = order_h[start[e]:start[e + 1]]
                tok, slot = pick // k, pick % k
                y = self._expert(self.backend, xh[tok], self.records[(layer, e)], layer, act) * w_h[tok, slot, None]
                acc.index_add_(0, tok, y)
            out += acc.to(x.device, x.dtype)
        return out


def _native_cpu(backend, layout) -> bool:
    """Whether the CPU backend computes this layout in its own module (not a GGUF block format)."""
    from ..kernels.cpu_backend import _gguf_spec
    return hasattr(backend, "module") and _gguf_spec(layout) is None
