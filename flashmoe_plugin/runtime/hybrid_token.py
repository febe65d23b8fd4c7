"""A decode token with `n_cpu_moe` layers as ONE captured graph and ONE host call (issue 10).

HybridDecode (runtime/hybrid_decode.py) replays a graph per segment between two CPU layers and,
between two replays, waits for the packed row, reads it into Python, plans the split, calls the C
kernels and queues the copy up: per CPU layer ~0.3 ms of host and sync on the H200 beside the
~1.55 ms the C kernels take. When the tuner keeps every expert of the CPU layers on the CPU (the
H200's Mixtral rows do), none of that is needed per layer:
- the device runs the whole token as one graph: the segments in turn, each CPU layer's cut a
  small kernel (kernels/handoff.py) that writes the packed row (x, weights, ids; fp32) into
  mapped pinned memory, raises the layer's `ready` flag to the token's sequence number and spins
  on the host's `done` flag, then converts the host's fp32 sum into `delta_buf`;
- the host makes ONE call per token (the CPU kernels' HybridPlan, GIL released) that walks the CPU
  layers: spin on ready, run the chosen experts on the C pool (its threads spin between layers),
  write the sum, set done.
The tuner stays honest: it gets each CPU layer's time from the host's own clock (from one row
seen to the next: the C call, the hand-back and the next layer's segment), as decode measured it.
A token whose tuner share is not "all on the CPU" (the descent, its rechecks) or a tiered engine (cut at every MoE layer) takes HybridDecode's segmented path. A wait past its
timeout raises (the device's own wait gives up after as long and flags it).

CPU twin (CI): the same host call, with a Python thread playing the device (the segments uncaptured,
the flags and rows in plain memory): the logits equal the segmented path's.
"""
from __future__ import annotations

import os
import threading
import time

import torch

from ..kernels import handoff as dev_handoff

TIMEOUT_S = 10.0  # a row or an answer not there within this: something is broken, not slow
FLAG = 16  # int32s between two layers' flags (one cache line each)
TWIN = False  # the CPU twin fused too (tests set it; on a CPU run the segmented path is the default)


def why_not(dec) -> str:
    """Why HybridDecode `dec` cannot run its tokens fused ('' when it can)."""
    e = dec.e
    cl = e.cpu_layers
    if os.environ.get("FLASHMOE_FUSED_TOKEN", "1") == "0":
        return "FLASHMOE_FUSED_TOKEN=0"
    if cl is None or not dec.cpu or dec.cpu != list(cl.layers):
        return "not an n_cpu_moe engine cut at its CPU layers only (tiered)"
    if dec.mode != "on":
        return f"decode_graph {dec.mode}"
    if any(cl.cut[layer][0] != 1 for layer in cl.layers):
        return "experts sliced (FLASHMOE_SLICE_EXPERTS=1)"
    lays = {cl.cut[layer][1] for layer in cl.layers}
    if len(lays) != 1:
        return "CPU layers of different record layouts"
    from .cpu_layers import _native_cpu
    if not _native_cpu(cl.backend, next(iter(lays))):
        return "the records' format has no native CPU kernel in one call (a GGUF block format)"
    if dec.cuda:
        if not dec.graphs:
            return "the segments are not captured: " + dec.why_not
        m, why = dev_handoff.module()
        if m is None:
            return f"compiled module _handoff_cuda not built: {why}"
    return ""


class FusedToken:
    def __init__(self, dec):
        self.dec, self.e = dec, dec.e
        cl, cfg = self.e.cpu_layers, dec.cfg
        self.cl, self.top = cl, cl.k
        n, H, k = len(dec.cpu), cfg.hidden_size, cfg.top_k
        pin = dec.cuda
        self.ready = torch.zeros(n, FLAG, dtype=torch.int32, pin_memory=pin)
        self.done = torch.zeros(n, FLAG, dtype=torch.int32, pin_memory=pin)
        self.packs = torch.zeros(n, H + 2 * k, dtype=torch.float32, pin_memory=pin)
        self.outs = torch.zeros(n, H, dtype=torch.float32, pin_memory=pin)
        self.err = torch.zeros(FLAG, dtype=torch.int32, pin_memory=pin)
        self.t_ready = torch.zeros(n, dtype=torch.int64)
        self.ids = torch.zeros(n, k, dtype=torch.int32)
        lay = cl.cut[cl.layers[0]][1]
        records = [[cl.records[(layer, x)][:lay.size] for x in range(cl.experts[layer])] for layer in cl.layers]
        self.plan = cl.backend.module.HybridPlan(self.ready, self.done, self.packs, self.outs, records,
                                                 cl.backend.spec(lay), self.t_ready, self.ids)
        self.seq = 0  # tokens run fused (the device counts its own: seqdev)
        self.tokens = 0
        self.graph = None
        if dec.cuda:
            self.seqdev = torch.zeros(n, 1, dtype=torch.int32, device=dec.e.device)
            addr = dev_handoff.mapped
            self._addr = [(addr(self.packs[j]), addr(self.ready[j]), addr(self.done[j]), addr(self.outs[j]))
                          for j in range(n)]
            self._err = addr(self.err)
            props = torch.cuda.get_device_properties(dec.e.device)
            rate = getattr(props, "clock_rate", 0) or 2_000_000  # kHz
            self._cycles = int(TIMEOUT_S * rate * 1e3)
            self._capture()

    # ------------------------------------------------------------------ the device's side
    def _hand(self, j: int):
        """CPU layer j's cut, inside the token's graph (the segment left its row in dec.pack)."""
        d = self.dec
        hp, rd, dn, ho = self._addr[j]
        dev_handoff.handoff(d.pack, hp, rd, dn, self.seqdev[j], ho, d.delta_buf, self._err, self._cycles)

    def _body(self):
        d = self.dec
        for j in range(len(d.cpu) + 1):
            d._segment(j)
            if j < len(d.cpu):
                self._hand(j)

    def _capture(self):
        """The whole token as one graph, on the decode stream, in a pool of its own (the segments'
        graphs keep theirs). The hand-off kernel is loaded first by one launch that does not wait
        (a flag already set), as capture must not load modules."""
        d = self.dec
        flag = torch.ones(FLAG, dtype=torch.int32, pin_memory=True)
        seq = torch.zeros(1, dtype=torch.int32, device=d.e.device)
        out = torch.zeros(d.cfg.hidden_size, dtype=torch.float32, pin_memory=True)
        scratch = torch.zeros_like(d.pack, device="cpu").pin_memory()
        sink = torch.empty_like(d.delta_buf)
        m = dev_handoff.mapped
        with torch.cuda.stream(d.stream):
            dev_handoff.handoff(d.pack, m(scratch), m(flag[8:]), m(flag), seq, m(out), sink, m(flag[4:]), self._cycles)
        d.stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle(), stream=d.stream,
                                                      capture_error_mode="thread_local"):
            self._body()
        self.graph = g

    def close(self):
        """Drop the graph and the host call's plan (it holds the CPU layers' records); the counts stay."""
        self.graph = self.plan = None

    # ------------------------------------------------------------------ a token
    def usable(self) -> bool:
        """Whether this token runs fused: every expert of the CPU layers on the CPU (the tuner's
        share in use is all of them)."""
        cl = self.cl
        if self.plan is None:
            return False
        if cl.tuners is None:
            return cl.plan(self.top, 1) == self.top
        return cl.tuner_of(self.top).c == self.top

    def run(self):
        """The token's layers (the caller settles the read-back): the graph replayed (or, on the
        CPU twin, the device played by a thread) while this thread runs the host call."""
        self.seq += 1
        self.tokens += 1
        if self.graph is not None:
            self.graph.replay()
            self.plan.run(self.seq, TIMEOUT_S)
            if self.err[0]:
                raise RuntimeError("fused decode token: the device gave up waiting for a CPU layer's sum "
                                   f"({TIMEOUT_S} s)")
        else:
            twin = _TwinDevice(self)
            twin.start()
            try:
                self.plan.run(self.seq, TIMEOUT_S)
            finally:
                twin.join()
            if twin.error is not None:
                raise twin.error
        self._feed_tuner()
        if self.e.trace is not None:  # the CPU layers' routing, as the segmented path records it (bench's trace)
            for layer, chosen in zip(self.dec.cpu, self.ids.tolist()):
                self.e.trace.route(layer, [chosen])

    def _feed_tuner(self):
        """Each CPU layer's time, from its row seen to the next one's (the segmented path's
        measure, from one decode call to the next), to the split tuner."""
        cl = self.cl
        cl._last = None  # the segmented path's pending measure spans no fused token
        if cl.tuners is None:
            return
        tuner = cl.tuner_of(self.top)
        t = self.t_ready.tolist()
        for a, b in zip(t, t[1:]):
            tuner.record(self.top, (b - a) / 1e9)


class _TwinDevice(threading.Thread):
    """The CPU twin's device: the segments run uncaptured and each CPU layer's cut handed over
    through the same flags and rows as the hand-off kernel's (its waits are polls)."""

    def __init__(self, fused: FusedToken):
        super().__init__(daemon=True)
        self.f, self.error = fused, None

    def run(self):
        f, d = self.f, self.f.dec
        try:
            with torch.inference_mode():
                for j in range(len(d.cpu) + 1):
                    d._segment(j)
                    if j == len(d.cpu):
                        break
                    f.packs[j].copy_(d.pack)
                    f.ready[j, 0] = f.seq
                    t0 = time.monotonic()
                    while int(f.done[j, 0]) != f.seq:
                        if time.monotonic() - t0 > TIMEOUT_S:
                            raise TimeoutError(f"twin device: CPU layer {j}'s sum never came")
                        time.sleep(0)
                    d.delta_buf.copy_(f.outs[j])
        except BaseException as err:  # noqa: BLE001 - handed to the host's thread
            self.error = err
            for j in range(len(d.cpu)):  # the host call must not wait for rows that never come
                f.ready[j, 0] = f.seq
