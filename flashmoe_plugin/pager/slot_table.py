"""The device-side slot table: (layer, expert) -> where the record sits in tier 0, as a tensor on
the compute device, so that a decode step can look its experts up without asking the host
(runtime/graph_decode.py gathers the routed experts' entries and hands them to the fused kernel).

Entries are tier-0 slot indices (the same table on CPU and CUDA, so CI tests the one the GPU
uses); `addresses(idx)` turns looked-up slots into record addresses on the device (one kernel),
the form the fused CUDA kernel reads. An absent record's entry is slot 0: always valid memory,
so a step that reads it computes garbage but never faults; `present` marks the resident entries,
the step counts each layer's misses from it on the device, and the host, seeing a miss in the
row it reads back, recomputes from that layer.

The pager keeps the table current: tier 0 calls `watch(key, slot)` on every put and
`watch(key, None)` on every removal (SlotPool.watch). Each change is one small stream-ordered
write, so it lands before any later step reads the table. A record that came in by an
asynchronous copy has a fence; `ready()` makes the compute stream wait for the fences of the
slots filled since the last call.
"""
from __future__ import annotations

import torch


class SlotTable:
    def __init__(self, pager, layers: list[int], num_experts: int):
        self.pager = pager
        self.rows = {layer: i for i, layer in enumerate(layers)}
        pool = pager.t0
        dev = pool.slots.device
        self.entries = torch.zeros((len(layers), num_experts), dtype=torch.int64, device=dev)
        # 1 where the entry names a resident record: the step counts its misses on the device
        # (decode_ops.missing), so the host reads one row per layer instead of asking tier 0
        self.present = torch.zeros((len(layers), num_experts), dtype=torch.int64, device=dev)
        self._base = torch.tensor([pool.slots.data_ptr()], dtype=torch.int64, device=dev)
        self._stride = pool.slots.stride(0)
        self.pending: set[int] = set()
        for key, slot in list(pool.slot_of.items()):
            self.watch(key, slot)
        pool.watch = self.watch

    def watch(self, key, slot: int | None):
        layer, expert = key
        row = self.rows.get(layer)
        if row is None:
            return
        self.entries[row, expert] = 0 if slot is None else slot
        self.present[row, expert] = slot is not None
        if slot is not None:
            self.pending.add(slot)

    def ready(self):
        """The compute stream waits for the copies that filled slots since the last call."""
        p = self.pager
        for slot in self.pending:
            p.copies.use(p.t0.fence[slot])
        self.pending.clear()

    def lookup(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Slots of `ids` (a 1-D device tensor of expert ids) in `layer`: no host round trip."""
        return self.entries[self.rows[layer]].index_select(0, ids)

    def addresses(self, slots: torch.Tensor) -> torch.Tensor:
        """Record addresses of tier-0 slots, on the device (base + slot * record stride)."""
        return torch.add(self._base, slots, alpha=self._stride)

    def resident(self, layer: int, experts) -> bool:
        t0 = self.pager.t0
        return all((layer, int(e)) in t0 for e in experts)

    def detach(self):
        if getattr(self.pager.t0, "watch", None) == self.watch:
            self.pager.t0.watch = None
