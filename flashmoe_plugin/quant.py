"""Group-wise weight formats and their reference (torch) pack/unpack.

A weight W of shape [out, in] is stored as one *part*: contiguous sections, each aligned to 64
bytes inside the part. Quantization is affine along the input dimension in groups of 64:

    q8: q int8 [out, in]          scales f16 [out, in/64]                  W = q * s   (8.25 bit)
    q4: q uint8 [out, in/2]       scales f16, biases f16 [out, in/64]      W = q * s + b (4.5 bit)
    q2: q uint8 [out, in/4]       scales f16, biases f16 [out, in/64]      W = q * s + b (2.5 bit)
    f32 / f16 / bf16: the raw matrix (exact; `--quant none` keeps the source dtype)

Packing is little-end first: in q4 element 2j is the low nibble of byte j, element 2j+1 the
high one; in q2 element 4j+k sits in bits 2k..2k+1 of byte j. Every native kernel is tested
against `dequantize` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import quant_gguf

GROUP = 64
SECTION_ALIGN = 64
RAW_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANT_BITS = {"q8": 8, "q4": 4, "q2": 2}
FORMATS = tuple(RAW_DTYPES) + tuple(QUANT_BITS)
DTYPE_FORMATS = {v: k for k, v in RAW_DTYPES.items()}


class Packed(NamedTuple):
    """A weight handed over in its stored packed format (a GGUF file's blocks, kept as they are):
    the part's bytes (1-D uint8), its format and its [out, in] shape."""
    data: torch.Tensor
    fmt: str
    shape: tuple


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def _align(n: int, a: int = SECTION_ALIGN) -> int:
    return (n + a - 1) // a * a


def check_shape(fmt: str, shape) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    if len(shape) != 2:
        raise ValueError(f"format {fmt}: expected a 2-D weight, got shape {tuple(shape)}")
    out, inp = int(shape[0]), int(shape[1])
    if fmt in QUANT_BITS and inp % GROUP:
        raise ValueError(f"format {fmt}: input dimension {inp} is not a multiple of the group size {GROUP}")
    return out, inp


def sections(fmt: str, shape) -> list[Section]:
    """The sections of one part, in storage order, with offsets relative to the part's start."""
    out, inp = check_shape(fmt, shape)
    if fmt in RAW_DTYPES:
        return [Section("w", 0, RAW_DTYPES[fmt], (out, inp))]
    per_byte = 8 // QUANT_BITS[fmt]
    qdtype = torch.int8 if fmt == "q8" else torch.uint8
    specs = [("q", qdtype, (out, inp // per_byte)), ("scales", torch.float16, (out, inp // GROUP))]
    if fmt != "q8":
        specs.append(("biases", torch.float16, (out, inp // GROUP)))
    result, off = [], 0
    for name, dt, shp in specs:
        s = Section(name, off, dt, shp)
        result.append(s)
        off = _align(off + s.nbytes)
    return result


def part_nbytes(fmt: str, shape) -> int:
    if quant_gguf.is_block_format(fmt):
        return quant_gguf.part_nbytes(fmt, shape)
    secs = sections(fmt, shape)
    return _align(secs[-1].offset + secs[-1].nbytes)


def views(buf: torch.Tensor, fmt: str, shape) -> dict[str, torch.Tensor]:
    """Zero-copy typed views of a part held in a uint8 tensor."""
    out = {}
    for s in sections(fmt, shape):
        out[s.name] = buf[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
    return out


# ---------------------------------------------------------------- quantize

def _fit_affine(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (group) scale and bias minimising squared error, for q in [0, levels].

    Tries several shrunken min-max ranges, refines each with the least-squares (s, b) for the
    chosen codes, and keeps the best per group. Plain min-max wastes levels on outliers, which is
    what broke 2-bit output in Flash-MoE."""
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_b = torch.zeros_like(lo), lo.clone()
    shrinks = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7) if levels <= 3 else (1.0, 0.95, 0.9, 0.85)
    for shrink in shrinks:
        s = (2 * half * shrink / levels).clamp_min(1e-12)
        b = mid - half * shrink
        for _ in range(2):
            q = torch.clamp(torch.round((w - b[:, None]) / s[:, None]), 0, levels)
            qm = q.mean(dim=1)
            wm = w.mean(dim=1)
            var = (q * q).mean(dim=1) - qm * qm
            cov = (q * w).mean(dim=1) - qm * wm
            ok = var > 1e-12
            s = torch.where(ok, cov / torch.where(ok, var, torch.ones_like(var)), s)
            b = torch.where(ok, wm - s * qm, wm)
            s = torch.where(s.abs() < 1e-12, torch.full_like(s, 1e-12), s)
        s16, b16 = s.half().float(), b.half().float()
        safe = torch.where(s16 != 0, s16, torch.ones_like(s16))
        q = torch.clamp(torch.round((w - b16[:, None]) / safe[:, None]), 0, levels)
        q = torch.where(s16[:, None] != 0, q, torch.zeros_like(q))
        err = ((q * s16[:, None] + b16[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s16, best_s)
        best_b = torch.where(better, b16, best_b)
    return best_s, best_b


def _fit_symmetric(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-group scale for q = round(w / s) in [-qmax, qmax]: the best of a few clipped ranges,
    then the least-squares scale for the chosen codes."""
    amax = w.abs().max(dim=1).values.clamp_min(1e-12)
    best_err, best_s = torch.full_like(amax, float("inf")), amax / qmax
    for shrink in (1.0, 0.98, 0.96, 0.94, 0.92, 0.9):
        s = amax * shrink / qmax
        q = torch.clamp(torch.round(w / s[:, None]), -qmax, qmax)
        qq = (q * q).sum(dim=1)
        s = torch.where(qq > 0, (q * w).sum(dim=1) / qq.clamp_min(1e-12), s).clamp_min(1e-12)
        s = s.half().float().clamp_min(2 ** -24)
        q = torch.clamp(torch.round(w / s[:, None]), -qmax, qmax)
        err = ((q * s[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s


def _quantize_rows(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    out, inp = w.shape
    g = w.reshape(-1, GROUP).float()
    if fmt == "q8":
        s = _fit_symmetric(g, 127)
        q = torch.clamp(torch.round(g / s[:, None]), -127, 127).to(torch.int8)
        return {"q": q.view(out, inp), "scales": s.half().view(out, inp // GROUP)}
    levels = (1 << QUANT_BITS[fmt]) - 1
    s, b = _fit_affine(g, levels)
    safe = torch.where(s != 0, s, torch.ones_like(s))  # an fp16 scale of 0: all codes 0
    q = torch.clamp(torch.round((g - b[:, None]) / safe[:, None]), 0, levels)
    q = torch.where(s[:, None] != 0, q, torch.zeros_like(q)).to(torch.uint8).view(out, inp)
    per_byte = 8 // QUANT_BITS[fmt]
    bits = QUANT_BITS[fmt]
    packed = torch.zeros(out, inp // per_byte, dtype=torch.uint8)
    for k in range(per_byte):
        packed |= q[:, k::per_byte] << (bits * k)
    return {"q": packed, "scales": s.half().view(out, -1), "biases": b.half().view(out, -1)}


def quantize(w: torch.Tensor, fmt: str, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Pack a float weight [out, in] into one part (uint8 tensor of part_nbytes bytes)."""
    out, inp = check_shape(fmt, w.shape)
    buf = torch.zeros(part_nbytes(fmt, (out, inp)), dtype=torch.uint8)
    if fmt in RAW_DTYPES:
        raw = w.to(RAW_DTYPES[fmt]).contiguous().view(-1).view(torch.uint8)
        buf[:raw.numel()] = raw  # the part may be padded to SECTION_ALIGN
        return buf
    dst = views(buf, fmt, (out, inp))
    # Chunk rows so that temporaries stay small even for 14336 x 4096 matrices.
    step = rows_per_chunk or max(1, (1 << 22) // inp)
    for r in range(0, out, step):
        for name, t in _quantize_rows(w[r:r + step], fmt).items():
            dst[name][r:r + step] = t
    return buf


def quantize_q8_absmax(w: torch.Tensor, rows_per_chunk: int | None = None) -> torch.Tensor:
    """q8 with the plain absmax scale per group, s = fp16(max|w| / 127), codes round(w * (1 / s)):
    one pass, no search. The load-time quantizer of `--dense-quant q8` (its native twin runs
    ~50x faster than the searched fit: seconds, not minutes, for Mixtral's 1.47 G dense weights);
    at 8 bits the search buys little (benchmarks/results/devbox-c10-q8-absmax.json)."""
    out, inp = check_shape("q8", w.shape)
    buf = torch.zeros(part_nbytes("q8", (out, inp)), dtype=torch.uint8)
    dst = views(buf, "q8", (out, inp))
    step = rows_per_chunk or max(1, (1 << 22) // inp)
    for r in range(0, out, step):
        g = w[r:r + step].reshape(-1, GROUP).float()
        s = (g.abs().amax(dim=1) / 127).clamp_min(2 ** -24).half()
        q = torch.clamp(torch.round(g * (1.0 / s.float())[:, None]), -127, 127).to(torch.int8)
        dst["q"][r:r + step] = q.view(-1, inp)
        dst["scales"][r:r + step] = s.view(-1, inp // GROUP)
    return buf


def dequantize(buf: torch.Tensor, fmt: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix a part encodes: the reference every kernel is checked against."""
    if quant_gguf.is_block_format(fmt):
        return quant_gguf.dequantize(buf, fmt, shape, dtype)
    out, inp = check_shape(fmt, shape)
    v = views(buf, fmt, (out, inp))
    if fmt in RAW_DTYPES:
        return v["w"].to(dtype)
    s = v["scales"].float()
    if fmt == "q8":
        q = v["q"].float()
        return (q.view(out, -1, GROUP) * s[..., None]).view(out, inp).to(dtype)
    bits = QUANT_BITS[fmt]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    p = v["q"]
    q = torch.stack([(p >> (bits * k)) & mask for k in range(per_byte)], dim=-1).view(out, inp).float()
    b = v["biases"].float()
    return (q.view(out, -1, GROUP) * s[..., None] + b[..., None]).view(out, inp).to(dtype)


def bits_per_weight(fmt: str) -> float:
    if fmt in RAW_DTYPES:
        return 8.0 * torch.tensor([], dtype=RAW_DTYPES[fmt]).element_size()
    return QUANT_BITS[fmt] + (16 if fmt == "q8" else 32) / GROUP
