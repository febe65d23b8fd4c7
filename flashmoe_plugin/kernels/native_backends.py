"""Registers the native backends (cpu: C, cuda: CUDA). Each one's available() says why it is
unusable when its compiled module is missing, so `flashmoe plugins` can report it."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_backends(register):
    try:  # TEMP until the kernel modules land
        from .cpu_backend import CpuBackend
        register(CpuBackend())
    except ModuleNotFoundError:
        pass
    try:
        from .cuda_backend import CudaBackend
        register(CudaBackend())
    except ModuleNotFoundError:
        pass
