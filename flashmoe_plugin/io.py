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
           "crc32c", "crc32c_combine", "crc32c_impl", "crc32c_ptr", "aligned_empty", "advise_huge_pages"]


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def aligned_empty(nbytes: int, align: int = DIRECT_ALIGN, zero: bool = False, huge: bool = False):
    """A uint8 torch tensor of nbytes over an AlignedBuffer (which the tensor keeps alive): a
    destination for O_DIRECT reads and a candidate for pinning. huge=True (memory the kernels
    stream through, e.g. the expert tiers): aligned to 2 MiB and advised MADV_HUGEPAGE before any
    page is touched (see advise_huge_pages)."""
    import torch

    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not huge:
        return torch.frombuffer(AlignedBuffer(nbytes, align, zero), dtype=torch.uint8)
    buf = AlignedBuffer(nbytes, max(align, HUGE_PAGE), False)
    advise_huge_pages(buf.address, nbytes)  # before the first touch: the pages are faulted in huge
    t = torch.frombuffer(buf, dtype=torch.uint8)
    return t.zero_() if zero else t


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """madvise(MADV_HUGEPAGE) over [address, address + nbytes) (Linux; False where it is refused).
    With 4 KiB pages, streaming a token's experts (198 MB per Mixtral layer) from RAM misses the
    TLB every 4 KiB, and in a virtual machine each miss walks two page tables; with the system's
    THP mode "madvise" (the default of many distributions) memory is only given huge pages when
    asked, and with "always" only while unfragmented 2 MiB blocks are free, which depends on what
    ran before (benchmarks/README.md, h11)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = (address + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # madvise wants a page-aligned start
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return end > start and libc.madvise(start, end - start, 14) == 0  # MADV_HUGEPAGE
