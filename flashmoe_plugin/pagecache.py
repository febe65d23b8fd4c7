"""How much of a set of files the OS page cache holds (mincore over a read-only mapping), so
that figures say where bytes came from: a buffered read of cached pages is a memory copy, not
the disk. None where the platform does not tell (no mincore, mapping refused)."""
from __future__ import annotations

import ctypes
import os

import numpy as np

PROT_READ, MAP_SHARED = 1, 1


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def cached_fraction(paths) -> float | None:
    """Fraction of the files' pages resident in the page cache (0..1), or None if unknown."""
    try:
        libc, page = _libc(), os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        return None
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
                total += pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None
