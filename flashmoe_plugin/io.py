"""Native I/O for the pager and the store: the C expert reader and CRC-32C.

The implementation is compiled from csrc/cpu/fm_io.c and crc32c.c through cython/_io.pyx into
flashmoe_plugin._io; this module re-exports it with a clear message when it is not built.

    from flashmoe_plugin.io import Reader, AlignedBuffer, crc32c, ReadError, ChecksumError

    buf = AlignedBuffer(nbytes)                        # 4096-aligned, buffer protocol
    with Reader(nthreads=4, direct=False) as reader:
        fid = reader.open("experts/layer_000.bin")
        reader.read([(fid, offset, nbytes, buf.address, expected_crc)])    # blocks, GIL released
        ticket = reader.submit(requests, priority=0)   # asynchronous: ticket.done(), ticket.wait()

A request is (file_id, offset, nbytes, dest, expected_crc32c_or_None); dest is an int address or a
writable contiguous buffer (AlignedBuffer, memoryview slice, numpy array, CPU torch tensor).
"""
from __future__ import annotations

try:
    from ._io import (DIRECT_ALIGN, AlignedBuffer, ChecksumError, ReadError, Reader, Ticket,
                      crc32c, crc32c_combine, crc32c_impl, crc32c_ptr)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "flashmoe_plugin._io, the compiled expert reader, is not built: install the package with "
        "`pip install -e .` from the repository (needs a C compiler; Cython comes with the build)"
    ) from e

__all__ = ["DIRECT_ALIGN", "AlignedBuffer", "ChecksumError", "ReadError", "Reader", "Ticket",
           "crc32c", "crc32c_combine", "crc32c_impl", "crc32c_ptr", "aligned_empty"]


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN, zero: bool = False):
    """A uint8 torch tensor of nbytes over an AlignedBuffer (which the tensor keeps alive): a
    destination for O_DIRECT reads and a candidate for pinning."""
    import torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(AlignedBuffer(nbytes, align, zero), dtype=torch.uint8)
