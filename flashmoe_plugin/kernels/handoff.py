"""The device side of a decode token's n_cpu_moe layers handed to the host inside one captured
graph (compiled module flashmoe_plugin._handoff_cuda, csrc/cuda/fm_handoff.cu): one small kernel
per CPU layer writes the layer's packed row into mapped host memory, raises a flag and spins on
the host's answer. The host side is the CPU kernels' HybridPlan (csrc/cpu/fm_handoff.c)."""
from __future__ import annotations

import torch

from . import compiled


def module():
    """(the compiled module, "") or (None, why it is not there)."""
    return compiled("_handoff_cuda")


def mapped(t: torch.Tensor) -> int:
    """The device address of pinned host tensor t (with unified addressing: its own address)."""
    m, why = module()
    if m is None:
        raise RuntimeError(f"compiled module flashmoe_plugin._handoff_cuda not built: {why}")
    return m.mapped(t) or t.data_ptr()


def handoff(pack, host_pack: int, ready: int, done: int, seq, host_out: int, delta, err: int, timeout_cycles: int):
    """Queue one CPU layer's hand-off on the current stream (capturable): pack -> host_pack,
    ready = ++seq, wait for done == seq, host_out -> delta."""
    m, why = module()
    if m is None:
        raise RuntimeError(f"compiled module flashmoe_plugin._handoff_cuda not built: {why}")
    m.handoff(pack, host_pack, ready, done, seq, host_out, delta, err, timeout_cycles)
