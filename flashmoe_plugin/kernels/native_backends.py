"""Registers the native backends (cpu: C, cuda: CUDA). Each one's available() says why it is
unusable when its compiled module is missing, so `flashmoe plugins` can report it."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from .cpu_backend import CpuBackend
    from .cuda_backend import CudaBackend
    register(CpuBackend())
    register(CudaBackend())
