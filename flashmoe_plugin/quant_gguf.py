"""llama.cpp's block formats as weight-part formats (next to quant.py's own group formats).

A part of format `q4_0`, `q8_0`, ... and shape [rows, cols] is the GGUF tensor's bytes for those
rows as llama.cpp writes them: each row cols/B blocks of S bytes (B elements each), rows back to
back, no padding (so an expert's slice of a stacked `ffn_*_exps` tensor is a part as it lies in
the file). F32/F16/BF16 tensors are our raw formats `f32`/`f16`/`bf16` (same row-major bytes).

The reference dequantization is gguf-py's `gguf.quants.dequantize` (the format's definition in
llama.cpp's own Python); our C and CUDA kernels are tested against it bit for bit.
"""
from __future__ import annotations

# name -> (GGML type id, elements per block, bytes per block)
BLOCK_FORMATS = {
    "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24), "q8_0": (8, 32, 34),
    "q4_k": (12, 256, 144), "q5_k": (13, 256, 176), "q6_k": (14, 256, 210),
    "mxfp4": (39, 32, 17),  # gpt-oss's experts as llama.cpp's converter writes them
}
RAW_TYPES = {0: "f32", 1: "f16", 30: "bf16"}
_BY_ID = {v[0]: k for k, v in BLOCK_FORMATS.items()}


def is_block_format(fmt: str) -> bool:
    return fmt in BLOCK_FORMATS


def format_of_type(type_id: int) -> str | None:
    """Our part format for a GGML tensor type id, or None if we cannot compute it."""
    return RAW_TYPES.get(int(type_id)) or _BY_ID.get(int(type_id))


def row_nbytes(fmt: str, cols: int) -> int:
    _, blk, size = BLOCK_FORMATS[fmt]
    if cols % blk:
        raise ValueError(f"format {fmt}: {cols} columns is not a multiple of its block of {blk}")
    return cols // blk * size


def part_nbytes(fmt: str, shape) -> int:
    rows, cols = int(shape[0]), int(shape[1])
    return rows * row_nbytes(fmt, cols)


def dequantize(buf, fmt: str, shape, dtype=None):
    """The float matrix [rows, cols] a part encodes (torch, through gguf-py's numpy reference)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as ref

    rows, cols = int(shape[0]), int(shape[1])
    raw = buf[:part_nbytes(fmt, shape)]
    raw = raw.cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, dtype=np.uint8)
    w = ref(raw.reshape(rows, -1), GGMLQuantizationType(BLOCK_FORMATS[fmt][0]))
    out = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).view(rows, cols)
    dev = buf.device if isinstance(buf, torch.Tensor) else "cpu"
    return out.to(device=dev, dtype=dtype or torch.float32)
