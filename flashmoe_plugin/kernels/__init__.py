"""Kernel backends: the only place that touches compiled modules. Backends come from the
`register_backends` hook; `select` picks the best available one for a device."""
from __future__ import annotations

import functools
import importlib

from .base import Backend


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    """(module, "") for one of the package's compiled modules (e.g. "_kernels_cuda"), or
    (None, why) where it is not built (no nvcc at install time, a broken build); looked up once."""
    try:
        return importlib.import_module(f"..{name}", __package__), ""
    except ImportError as e:
        return None, str(e) or type(e).__name__


def all_backends() -> dict[str, Backend]:
    from ..plugins import registry
    return registry().backends


def select(device: str, name: str | None = None) -> Backend:
    backends = all_backends()
    dev = device.split(":")[0]
    if name is not None:
        if name not in backends:
            raise ValueError(f"unknown kernel backend {name!r}; registered: {', '.join(sorted(backends))}")
        b = backends[name]
        ok, why = b.available()
        if not ok:
            raise RuntimeError(f"kernel backend {name!r} is not available here: {why}")
        if dev not in b.devices:
            raise ValueError(f"kernel backend {name!r} runs on {', '.join(b.devices)}, not {dev!r}")
        return b
    usable = [b for b in backends.values() if dev in b.devices and b.available()[0]]
    if not usable:
        raise RuntimeError(f"no kernel backend available for device {device!r}")
    return max(usable, key=lambda b: b.priority)


__all__ = ["Backend", "select", "all_backends", "compiled"]
