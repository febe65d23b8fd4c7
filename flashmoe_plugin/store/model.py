"""Open "a model" wherever one is accepted (Engine, Llama(model_path=...), run/bench/inspect/chat):
a store folder, a .gguf file, the first shard of a split GGUF, or `demo` (models_path.py names
them)."""
from __future__ import annotations

from .format import Store, StoreError


def open_model(path):
    """A format.Store or a gguf.GgufStore (the same reader interface)."""
    if isinstance(path, Store) or hasattr(path, "record_reads"):
        return path
    from ..models_path import resolve_model
    try:
        p = resolve_model(path)
    except ValueError as e:
        raise StoreError(str(e)) from None
    if p.is_dir():
        return Store.open(p)
    from .gguf import GgufStore, is_gguf
    if p.is_file() and is_gguf(p):
        return GgufStore.open(p)
    if not p.exists():
        raise StoreError(f"{p}: no such store folder or GGUF file")
    raise StoreError(f"{p}: neither a store folder nor a GGUF file")
