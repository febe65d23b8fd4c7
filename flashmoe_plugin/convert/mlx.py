"""MLX checkpoints (what `mlx_lm.convert -q` writes: config.json with a "quantization" entry,
safetensors whose quantized modules hold a packed uint32 `.weight` plus per-group `.scales` and
`.biases`) -> expert store.

MLX's affine quantization is ours: w = scale * q + bias per group of 64 inputs. 4-bit packs 8
codes per uint32, code j in bits 4j..4j+3, which on a little-endian machine is byte for byte our
q4 (code 2j in the low nibble of byte j, 2j+1 in the high one); 2-bit likewise is our q2. So
experts are copied, not requantized: the codes byte for byte, the scales and biases converted to
fp16, which must be exact (bf16 scales of ordinary size are; any that is not raises an error
naming the tensor; `--quant none` dequantizes instead). Dense quantized modules (attention,
routers at 8 bits, embeddings, ...) are dequantized to fp32: scale * q + bias of bf16 scales is
not a bf16 number, and MLX's quantized matmuls use it unrounded.
mlx-lm saves the hybrid models' zero-centred RMSNorm weights with the 1 already added (and the
conv1d weight as [C, K, 1]): such a store's config has norm_offset off."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from .. import quant as Q
from ..models.layers import required_names
from ..store import format as fmt
from ..store.layout import RecordLayout
from ..store.writer import StoreWriter
from .errors import ConvertError
from .hf import Checkpoint, read_source

EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.switch_mlp\.(gate_proj|up_proj|down_proj)$")
KEEP_BITS = {4: "q4", 2: "q2"}  # MLX affine formats that are ours exactly


def is_mlx(hf: dict) -> bool:
    q = hf.get("quantization")
    return isinstance(q, dict) and "bits" in q and "group_size" in q


def unpack(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint32 words [..., n] -> codes uint8 [..., n * 32 / bits] (code j of a word in bits
    j*bits..j*bits+bits-1)."""
    if bits not in (2, 4, 8):
        raise ConvertError(f"MLX {bits}-bit weights are not supported (2, 4 and 8 bits are)")
    words = w.to(torch.int64) & 0xFFFFFFFF  # w: the words as int32
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*w.shape[:-1], -1).to(torch.uint8)


def dequantize(w: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """mx.dequantize in torch: scale * q + bias per group, computed in fp32, returned in `dtype`
    (default: the scales' dtype, as mx.dequantize returns)."""
    q = unpack(w, bits).float()
    q = q.reshape(*q.shape[:-1], -1, group)
    out = q * scales.float()[..., None] + biases.float()[..., None]
    return out.reshape(*w.shape[:-1], -1).to(dtype or scales.dtype)


def _as_f16(t: torch.Tensor, what: str) -> torch.Tensor:
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        bad = (h.to(t.dtype) != t).nonzero()[0].tolist()
        raise ConvertError(f"{what}: value {t[tuple(bad)].item()!r} at {bad} has no exact fp16 form, so the "
                           "experts cannot be kept as they are; convert with --quant none (dequantized)")
    return h


def _canonical_source_name(name: str) -> str:
    """mlx-lm's VLM prefix (language_model.model.) -> the HF one our families classify."""
    name = re.sub(r"^language_model\.model\.", "model.language_model.", name)
    return re.sub(r"^language_model\.", "", name)


def convert_mlx(src, dst, quant: str = "q4", force: bool = False, progress=None) -> Path:
    src = Path(src)
    hf, arch, cfg = read_source(src)
    qcfg = hf["quantization"]
    ckpt = Checkpoint(src)

    def qparams(module: str) -> tuple[int, int]:
        per = qcfg.get(module)
        per = per if isinstance(per, dict) else {}
        return int(per.get("bits", qcfg["bits"])), int(per.get("group_size", qcfg["group_size"]))

    modules, experts = defaultdict(dict), defaultdict(dict)  # module -> {suffix: source name}
    for name in ckpt.names():
        module, _, suffix = name.rpartition(".")
        modules[module][suffix] = name
    dense = {}  # canonical -> (module, source names)
    for module, parts in modules.items():
        plain = _canonical_source_name(module)
        stripped = re.sub(r"^model\.language_model\.", "", plain)
        if m := EXPERT.match(stripped):
            experts[int(m.group(1))][m.group(2)] = (module, parts)
            continue
        for suffix, name in parts.items():
            if "scales" in parts and suffix in ("scales", "biases"):
                continue
            kind, *rest = arch.classify(f"{plain}.{suffix}")
            if kind == "dense":
                dense[rest[0]] = (module, parts, suffix)
            elif kind != "skip":
                raise ConvertError(f"{src}: tensor {name}: experts outside switch_mlp are not an MLX layout")

    folded = any(n.endswith("linear.conv1d.weight") and ckpt.entries[modules[m][s]][2][-1] == 1
                 for n, (m, _, s) in dense.items())
    if cfg.norm_offset and folded:  # mlx-lm added the 1 of (1 + w) to the norm weights already
        cfg = replace(cfg, norm_offset=False)
    missing = [n for n in required_names(cfg) if n not in dense]
    if missing:
        raise ConvertError(f"{src}: missing tensors for {arch.name}: {', '.join(missing[:5])}")
    stray = sorted(set(experts) - set(cfg.moe_layers))
    absent = sorted(set(cfg.moe_layers) - set(experts))
    if stray or absent:
        raise ConvertError(f"{src}: switch_mlp experts in layers {stray or absent}, but config.json's MoE layers "
                           f"are {cfg.moe_layers}")

    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    bits, group = qparams(experts[cfg.moe_layers[0]]["gate_proj"][0])
    kept = KEEP_BITS.get(bits) if group == Q.GROUP else None
    if quant == "none":
        efmt = None  # dequantized, raw in the scales' dtype (chosen below)
    elif kept is None or quant != kept:
        raise ConvertError(f"{src}: experts are MLX {bits}-bit, group {group}; they are kept exactly as "
                           f"{kept or '(no such format of ours)'}" + (f" (--quant {kept})" if kept else "")
                           + " or dequantized with --quant none; other formats would requantize")
    else:
        efmt = kept

    def layer_tensors(layer):
        """{gate_proj, up_proj, down_proj: (weight, scales, biases, bits, group) or dense float}."""
        out = {}
        for which in ("gate_proj", "up_proj", "down_proj"):
            if which not in experts[layer]:
                raise ConvertError(f"{src}: layer {layer}: switch_mlp.{which} missing")
            module, parts = experts[layer][which]
            if "scales" not in parts:
                out[which] = ckpt.get(parts["weight"])
                continue
            b, g = qparams(module)
            out[which] = (ckpt.get(parts["weight"]).view(torch.int32), ckpt.get(parts["scales"]),
                          ckpt.get(parts["biases"]), b, g)
        return out

    first = layer_tensors(cfg.moe_layers[0])
    if efmt is None:
        t = first["gate_proj"]
        efmt = Q.DTYPE_FORMATS.get((t[1] if isinstance(t, tuple) else t).dtype)
        if efmt is None:
            raise ConvertError(f"{src}: expert dtype cannot be stored raw")
    layout = RecordLayout.build(efmt, H, I)
    total = len(cfg.moe_layers) * E
    with StoreWriter(dst, layout, force=force) as w:
        done = 0
        for layer in cfg.moe_layers:
            t = first if layer == cfg.moe_layers[0] else layer_tensors(layer)
            w.begin_layer(layer, E)
            for e in range(E):
                w.write_record(_record(layout, t, e, efmt, f"{src}: layer {layer}"))
                done += 1
                if progress:
                    progress(done, total)
        for canon, (module, parts, suffix) in sorted(dense.items()):
            if "scales" in parts and suffix == "weight":
                b, g = qparams(module)
                tensor = dequantize(ckpt.get(parts["weight"]).view(torch.int32), ckpt.get(parts["scales"]),
                                    ckpt.get(parts["biases"]), b, g, torch.float32)
            else:
                tensor = ckpt.get(parts[suffix])
            w.add_dense(canon, tensor)
        for f in fmt.TOKENIZER_FILES:
            if (src / f).is_file():
                w.copy_file(src / f)
        return w.finish(arch.name, cfg.to_json(),
                        {"format": efmt, "group_size": Q.GROUP if efmt in Q.QUANT_BITS else None,
                         "dense": "dequantized from MLX to fp32 where quantized, else as stored"},
                        {"type": "mlx", "model_type": hf.get("model_type"),
                         "quantization": {"bits": qcfg["bits"], "group_size": qcfg["group_size"]},
                         "experts": "kept exactly (codes byte for byte, scales/biases as fp16)"
                         if efmt in Q.QUANT_BITS else "dequantized"})


def _record(layout: RecordLayout, t: dict, e: int, efmt: str, what: str) -> torch.Tensor:
    """Expert e's record. t: {gate_proj, up_proj, down_proj: (weight, scales, biases, bits, group)
    of the whole layer, or a float [E, out, in] tensor}."""
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for part, names in ((layout.parts[0], ("gate_proj", "up_proj")), (layout.parts[1], ("down_proj",))):
        dst = rec[part.offset:part.offset + part.nbytes]
        if efmt not in Q.QUANT_BITS:  # --quant none: dequantized, stored raw
            from ..kernels.quantize import quantize
            mats = [dequantize(*(x[e] for x in t[n][:3]), *t[n][3:]) if isinstance(t[n], tuple) else t[n][e]
                    for n in names]
            dst[:] = quantize(torch.cat(mats), efmt)
            continue
        if not all(isinstance(t[n], tuple) for n in names):
            raise ConvertError(f"{what}: switch_mlp expert matrices are not all quantized")
        views = Q.views(dst, efmt, part.shape)
        views["q"][:] = torch.cat([t[n][0][e] for n in names]).view(torch.uint8).view(views["q"].shape)
        views["scales"][:] = torch.cat([_as_f16(t[n][1][e], f"{what}: switch_mlp.{n}.scales") for n in names])
        views["biases"][:] = torch.cat([_as_f16(t[n][2][e], f"{what}: switch_mlp.{n}.biases") for n in names])
    return rec
