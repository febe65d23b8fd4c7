"""The device decode step for engines with `n_cpu_moe` layers (runtime/graph_decode.py's step, cut
at each CPU layer's experts).

The token runs as segments: segment j is everything from the previous CPU layer's experts (or the
embedding) through CPU layer j's attention and routing, which ends by packing that layer's FFN
input, expert weights and ids into one fp32 row and copying it to pinned host memory; the last
segment runs the remaining layers (their experts from VRAM through the slot table) and the logits.
On CUDA each segment is captured once as a CUDA graph, so a step is one replay per segment and,
between two replays, one wait for the packed row, then CpuLayers.decode: the layer's experts split
between the CPU's C kernels and the GPU (record copied into a VRAM ring slot), both at once. No
layer is relaunched op by op from Python and no step is thrown away (the whole-token graph with a
fallback at the first CPU layer recomputed the token from there, layer by layer).

While the split tuner keeps every expert of the CPU layers on the CPU, a token runs instead as one
graph and one host call (runtime/hybrid_token.py: no Python, launch or event wait between two CPU
layers); the segments stay for the other shares, tiered runs and a fused token that failed.

Layers after the last CPU layer can still miss (their records are paged): the ids are checked after
the step as DeviceDecode does, and the step resumes from the first miss through the pager path.
On CPU (the twin) the same segments run uncaptured.

Tiered runs (the device tier cannot hold every expert: `cut_layers`) are cut at every MoE layer:
with most experts resident but not all, nearly every token misses somewhere, and a whole-token
graph would be thrown away from its first miss and finished layer by layer. Here each MoE layer's
experts go through the engine's pager path (hits from VRAM, host-tier experts computed on the CPU
or copied up, reads from disk, the predictor's prefetches) between two replays.
"""
from __future__ import annotations

import torch

from ..models.layers import embed
from . import hybrid_token
from .graph_decode import DeviceDecode


def cut_layers(engine) -> list[int]:
    """The MoE layers whose experts the host handles between two replays: every MoE layer when
    the device tier cannot hold all the experts it serves, else the n_cpu_moe layers (none: the
    whole-token graph, DeviceDecode)."""
    cpu = engine.cpu_layers
    paged = [layer for layer in engine._moe_order if cpu is None or layer not in cpu]
    if sum(engine.store.layers[layer].experts for layer in paged) > engine.pager.capacity:
        return list(engine._moe_order)
    return [layer for layer in engine._moe_order if cpu is not None and layer in cpu]


class HybridDecode(DeviceDecode):
    def __init__(self, engine, mode: str = "on"):
        cfg, dev = engine.config, engine.device
        self.cpu = cut_layers(engine)
        H, k = cfg.hidden_size, cfg.top_k
        self.h_buf = torch.zeros(1, H, dtype=engine.dtype, device=dev)      # residual after the CPU layer's attention
        self.x_buf = torch.zeros(1, H, dtype=engine.dtype, device=dev)      # its FFN input (the GPU's share reads it)
        self.delta_buf = torch.zeros(1, H, dtype=engine.dtype, device=dev)  # its FFN output (the next segment adds it)
        self.shared_buf = torch.zeros(1, H, dtype=engine.dtype, device=dev)  # a shared expert's output, if any
        self.wts_buf = torch.zeros(1, k, dtype=engine.dtype, device=dev)  # its routing weights (the pager path's)
        self.pack = torch.zeros(H + 2 * k, dtype=torch.float32, device=dev)  # x, weights, ids for the host
        self.pack_host = torch.zeros(H + 2 * k, dtype=torch.float32)
        if dev.type == "cuda":
            self.pack_host = self.pack_host.pin_memory()
            self.packed = torch.cuda.Event()
        # views made once (DeviceDecode's own route_host is the whole step's routing read-back)
        self.x_host, self.pick_host = self.pack_host[:H].view(1, H), self.pack_host[H:]
        super().__init__(engine, mode)
        # the whole token as one graph and one host call while every CPU-layer expert stays on the CPU
        # (runtime/hybrid_token.py); fused_why says why not where it cannot
        self.fused, self.fused_why = None, hybrid_token.why_not(self)
        if not self.fused_why and (self.cuda or hybrid_token.TWIN):
            try:
                with torch.inference_mode():
                    self.fused = hybrid_token.FusedToken(self)
            except (RuntimeError, ValueError) as err:  # a capture or a launch the device refuses: segmented
                self.fused_why = f"fused token not captured: {type(err).__name__}: {err}"[:500]
        elif not self.fused_why:
            self.fused_why = "CPU run (the twin runs only where hybrid_token.TWIN is set)"

    # ------------------------------------------------------------------ a segment
    def _segment(self, j: int, fast: bool = True):
        c, m, w, ops, t = self.cfg, self.model, self.model.w, self.ops, self.table
        last = j == len(self.cpu)
        if j == 0:
            first, h, delta = 0, embed(self.token(), w["embed.weight"]), self.zero
        else:
            first, h = self.cpu[j - 1] + 1, self.h_buf
            delta = self.delta_buf + self.shared_buf if c.shared_expert_intermediate_size else self.delta_buf
        stop = c.num_layers if last else self.cpu[j] + 1
        cos, sin = ops.rope_tables(self.pos, m.inv_freq, self.hs.dtype)
        for i in range(first, stop):
            p, at = f"layers.{i}.", dict(cos=cos, sin=sin, pos=self.pos, kpos=self.kpos, **self.args[i], **self.consts)
            if i in t.rows:
                r = t.rows[i]
                h, x, ids, wts, addrs = ops.moe_layer(
                    h, delta, self.hs[i], ffn_norm=w[p + "ffn_norm.weight"], router_w=w[p + "moe.router.weight"],
                    ids_row=self.ids[r], entries_row=t.entries[r], base=t._base, top_k=c.top_k,
                    norm_topk=c.norm_topk_prob, stride=t._stride, **at)
                if not last and i == stop - 1:  # this segment's cut layer: hand its routing to the host
                    H, k = c.hidden_size, c.top_k
                    self.h_buf.copy_(h)
                    self.x_buf.copy_(x)
                    if self._x_to_host(i):  # the C kernels read x on the host
                        self.pack[:H].copy_(x[0])
                    if not self._on_cpu(i):  # the pager path takes the weights on the device
                        self.wts_buf.copy_(wts)
                    self.pack[H:H + k].copy_(wts[0])
                    self.pack[H + k:].copy_(ids[0])
                    if c.shared_expert_intermediate_size:
                        self.shared_buf.copy_(m.shared(i, x))
                    return
                delta = self._experts_of(i, x, ids, wts, h, addrs, fast)
                if c.shared_expert_intermediate_size:
                    delta = delta + m.shared(i, x)
            else:
                h = ops.attention(h, delta, self.hs[i], **at)
                delta = m.ffn(i, h, None)
        self._end(h, delta)

    def _host_layer(self, j: int):
        """Cut layer j's experts from the packed row (waited for), into delta_buf: a CPU layer's
        split between the C kernels and the GPU, or the pager path of any other layer."""
        e, c = self.e, self.cfg
        H, k, layer = c.hidden_size, c.top_k, self.cpu[j]
        on_cpu, with_x = self._on_cpu(layer), self._x_to_host(layer)
        # outside the graph: a plain copy to pinned memory (x only where the C kernels need it)
        (self.pack_host if with_x else self.pick_host).copy_(self.pack if with_x else self.pack[H:], non_blocking=True)
        if self.cuda:
            self.packed.record(self.stream)
            self.packed.synchronize()
        vals = self.pick_host.tolist()  # the weights, then the ids
        chosen = [int(v) for v in vals[k:]]  # ids < 2^24: exact in fp32
        if not on_cpu:  # the pager path, given x and the weights on the host (no read-back of its own)
            self.delta_buf.copy_(e._experts(layer, self.x_buf, torch.tensor([chosen]), self.wts_buf, self.h_buf,
                                            host=(self.x_host, vals[:k]) if with_x else None))
            return
        if e.trace is not None:
            e.trace.route(layer, [chosen])
        e.cpu_layers.decode(layer, self.x_host, chosen, vals[:k], self.x_buf, out=self.delta_buf)

    def _x_to_host(self, layer: int) -> bool:
        """Whether the packed row carries the layer's FFN input: for the C kernels (an n_cpu_moe
        layer, or a paged one whose host-tier records the CPU may compute)."""
        return self._on_cpu(layer) or self.e.host_compute.mode != "off"

    def _on_cpu(self, layer: int) -> bool:
        """An n_cpu_moe layer (its experts split by CpuLayers), not a paged one."""
        return self.e.cpu_layers is not None and layer in self.e.cpu_layers

    # ------------------------------------------------------------------ a decode step
    def _run(self):
        """The segments replayed (or run) in turn, each CPU layer computed by the host between them."""
        if self.mode == "eager":
            return super()._run()
        if self.fused is not None and self.fused.usable():
            try:
                self.fused.run()
            except (RuntimeError, TimeoutError, ValueError) as err:
                # not expected: this token again, segmented, and every later one (fused_why says why)
                self.fused_why = f"fused token failed, segmented from then on: {type(err).__name__}: {err}"[:500]
                self.fused = None
                self.pos.fill_(self.pos_value - 1)
            else:
                self.replays += self.fused.graph is not None
                self._settle(skip=set(self.cpu))
                return
        for j in range(len(self.cpu) + 1):
            if self.graphs:
                self.graphs[j].replay()
            else:
                self._segment(j)
            if j < len(self.cpu):
                self._host_layer(j)
        self.replays += bool(self.graphs)
        self._settle(skip=set(self.cpu))  # the cut layers' experts were handled by the host

    def close(self):
        super().close()
        if self.fused is not None:
            self.fused.close()

    def _pieces(self) -> list:
        """The segments between CPU layers, each captured as a graph of its own (DeviceDecode._capture)."""
        return [lambda j=j: self._segment(j) for j in range(len(self.cpu) + 1)]
