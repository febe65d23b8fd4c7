"""Sources -> expert store. Converters only write through store/."""
from __future__ import annotations

from pathlib import Path

from .errors import ConvertError
from .hf import QUANT_CHOICES, convert_hf


def convert(src, dst, quant: str = "q4", force: bool = False, progress=None) -> Path:
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: does not exist")
    if src.is_file():  # a GGUF file (or the first shard of a split one)
        from .gguf import convert_gguf
        return convert_gguf(src, dst, quant="keep" if quant is None else quant, force=force, progress=progress)
    return convert_hf(src, dst, quant=quant, force=force, progress=progress)


__all__ = ["convert", "ConvertError", "QUANT_CHOICES"]
