"""HF checkpoint folder (config.json + *.safetensors + tokenizer files) -> expert store.

Streams tensor by tensor through safetensors' lazy reader: at most one expert's weights (plus
the dense part, which is small next to the experts) are in memory at a time. Per-expert
(`experts.{e}.w1`) and fused 3-D (`experts.gate_up_proj`) layouts, single files and sharded
checkpoints all produce byte-identical stores."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch

from .. import quant as Q
from ..kernels.quantize import quantize
from ..models.base import ConfigError
from ..models.layers import required_names
from ..plugins import registry
from ..store import format as fmt
from ..store.layout import RecordLayout
from ..store.writer import StoreWriter
from .errors import ConvertError

QUANT_CHOICES = ("none", "bf16", "q8", "q4", "q2")


def find_architecture(hf: dict, where: Path):
    archs = registry().architectures
    keys = [hf.get("model_type"), *(hf.get("architectures") or [])]
    for k in keys:
        if k in archs:
            return archs[k]
    supported = sorted({a.name for a in archs.values()})
    raise ConvertError(f"{where}: unknown architecture {keys[0] or keys[1:]!r}; supported: {', '.join(supported)}")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U32": torch.uint32, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, read one at a time with pread
    (not mmap), and dropped from the page cache after use, so memory stays at one tensor."""

    def __init__(self, src: Path):
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ConvertError(f"{src}: no *.safetensors files")
        self.entries = {}  # name -> (path, dtype, shape, start, end)
        for f in files:
            path = src / f
            if not path.is_file():
                raise ConvertError(f"{path}: listed in model.safetensors.index.json but missing")
            for name, entry in self._header(path).items():
                self.entries[name] = entry
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if n not in self.entries or self.entries[n][0].name != f]
            if missing:
                raise ConvertError(f"{src}: tensors in the index but not in their shard: {', '.join(missing[:3])}")

    @staticmethod
    def _header(path: Path) -> dict:
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: not a safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: not a safetensors file (its header is not a JSON object)")
        out, base = {}, 8 + n
        for name, v in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(v, dict) or v.get("dtype") not in _DTYPES:
                raise ConvertError(f"{path}: tensor {name}: unsupported dtype "
                                   f"{v.get('dtype') if isinstance(v, dict) else v!r}")
            # every number checked before use: get() allocates by shape, so shape must match the
            # bytes that are really in the file
            offs, shape = v.get("data_offsets"), v.get("shape")
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(x) is int for x in offs)
                    and 0 <= offs[0] <= offs[1]):
                raise ConvertError(f"{path}: tensor {name}: bad data_offsets {offs!r}")
            if not (isinstance(shape, list) and len(shape) <= 8 and all(type(x) is int and x >= 0 for x in shape)):
                raise ConvertError(f"{path}: tensor {name}: bad shape {shape!r}")
            start, end = offs
            if base + end > size:
                raise ConvertError(f"{path}: truncated ({size} bytes; tensor {name} ends at {base + end})")
            numel = 1
            for x in shape:
                numel *= x
            if numel * _DTYPES[v["dtype"]].itemsize != end - start:
                raise ConvertError(f"{path}: tensor {name}: {end - start} bytes for shape {shape} of {v['dtype']}")
            out[name] = (path, _DTYPES[v["dtype"]], tuple(shape), base + start, base + end)
        return out

    def names(self):
        return self.entries.keys()

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self.entries[name]
        t = torch.empty(shape, dtype=dtype)
        view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if view.nbytes != end - start:
            raise ConvertError(f"{path}: tensor {name}: {end - start} bytes for shape {shape} of {dtype}")
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got:]], start + got)
                if n <= 0:
                    raise ConvertError(f"{path}: tensor {name}: unexpected end of file")
                got += n
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return t


def expert_format(quant: str, src_dtype: torch.dtype) -> str:
    if quant == "none":
        if src_dtype not in Q.DTYPE_FORMATS:
            raise ConvertError(f"source dtype {src_dtype} cannot be kept as is; pick --quant bf16|q8|q4|q2")
        return Q.DTYPE_FORMATS[src_dtype]
    if quant not in QUANT_CHOICES:
        raise ConvertError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    return quant


def read_source(src: Path) -> tuple[dict, object, object]:
    """(config.json, architecture, ModelConfig) of a checkpoint folder that has a tokenizer: what
    every safetensors converter (HF, MLX) checks first."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src}: no config.json (expected an HF checkpoint folder or a .gguf file)")
    hf = json.loads(cfg_path.read_text())
    arch = find_architecture(hf, cfg_path)
    try:
        cfg = arch.config_from_hf(hf)
    except ConfigError as e:
        raise ConvertError(f"{cfg_path}: {e}") from None
    if not (src / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: no tokenizer.json (the store needs the model's tokenizer)")
    return hf, arch, cfg


def convert_hf(src, dst, quant: str = "q4", force: bool = False, progress=None) -> Path:
    src = Path(src)
    hf, arch, cfg = read_source(src)
    cfg_path = src / "config.json"
    ckpt = Checkpoint(src)

    dense, experts, fused = {}, defaultdict(dict), {}
    for name in ckpt.names():
        kind, *rest = arch.classify(name)
        if kind == "dense":
            dense[rest[0]] = name
        elif kind == "expert":
            layer, e, which = rest
            experts[(layer, e)][which] = name
        elif kind == "fused":
            fused[tuple(rest)] = name
    missing = [n for n in required_names(cfg) if n not in dense]
    if missing:
        raise ConvertError(f"{src}: missing tensors for {arch.name}: {', '.join(missing[:5])}")

    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    stray = sorted(({l for (l, _) in experts} | {l for (l, _) in fused}) - set(cfg.moe_layers))
    if stray:
        raise ConvertError(f"{src}: expert tensors in layers {stray} that config.json says are dense")

    def fused_layer(layer: int) -> tuple:
        """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) of a fused layer."""
        if arch.fused_experts is not None:
            names = {k: n for (l, k), n in fused.items() if l == layer}
            try:
                return arch.fused_experts(ckpt.get, names, cfg)
            except (KeyError, ValueError) as e:
                raise ConvertError(f"{src}: layer {layer}: {e}") from None
        w13 = ckpt.get(fused[(layer, "w13")])
        w2 = ckpt.get(fused[(layer, "w2")]) if (layer, "w2") in fused else None
        if tuple(w13.shape) != (E, 2 * I, H):
            raise ConvertError(f"{fused[(layer, 'w13')]}: shape {tuple(w13.shape)}, expected {(E, 2 * I, H)}")
        if w2 is None or tuple(w2.shape) != (E, H, I):
            raise ConvertError(f"layer {layer}: fused down_proj missing or not of shape {(E, H, I)}")
        return w13, w2, None, None

    def expert_names(layer: int, e: int) -> dict:
        parts = experts.get((layer, e), {})
        for which in ("w1", "w3", "w2"):
            if which not in parts:
                raise ConvertError(f"{src}: layer {layer} expert {e}: tensor {which} "
                                   f"({dict(zip(('w1', 'w3', 'w2'), arch.expert_names))[which]}) missing")
        return parts

    def layer_experts(layer: int):
        """(w13, w2) of each expert of a layer; a fused layer's tensors are read once."""
        if any(l == layer for (l, _) in fused):
            w13, w2, b13, b2 = fused_layer(layer)
            for e in range(E):
                yield w13[e], w2[e], None if b13 is None else b13[e], None if b2 is None else b2[e]
            return
        for e in range(E):
            parts = expert_names(layer, e)
            w1, w3, w2 = (ckpt.get(parts[k]) for k in ("w1", "w3", "w2"))
            for t, shape, k in ((w1, (I, H), "w1"), (w3, (I, H), "w3"), (w2, (H, I), "w2")):
                if tuple(t.shape) != shape:
                    raise ConvertError(f"{parts[k]}: shape {tuple(t.shape)}, expected {shape}")
            yield torch.cat([w1, w3], dim=0), w2, None, None

    if not cfg.moe_layers:
        raise ConvertError(f"{cfg_path}: the model has no MoE layers")
    first = cfg.moe_layers[0]
    probe = next((n for (l, k), n in sorted(fused.items()) if l == first and not k.endswith(("_bias", "_scales"))),
                 None) or expert_names(first, 0)["w1"]
    efmt = expert_format(quant, torch.float32 if probe.endswith("_blocks") else ckpt.dtype(probe))
    try:
        layout = RecordLayout.build(efmt, H, I, biases=cfg.expert_bias)
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: experts of shape hidden {H} x intermediate {I} cannot be stored as "
                           f"{efmt}: {e}; use --quant none or bf16") from None
    total = len(cfg.moe_layers) * E
    with StoreWriter(dst, layout, force=force) as w:
        done = 0
        for layer in cfg.moe_layers:
            w.begin_layer(layer, E)
            for parts in layer_experts(layer):
                w.write_record(_record(layout, *parts))
                done += 1
                if progress:
                    progress(done, total)
        for canon, name in sorted(dense.items()):
            w.add_dense(canon, ckpt.get(name))
        for f in fmt.TOKENIZER_FILES:
            if (src / f).is_file():
                w.copy_file(src / f)
        return w.finish(arch.name, cfg.to_json(),
                        {"format": efmt, "group_size": Q.GROUP if efmt in Q.QUANT_BITS else None,
                         "dense": "source dtype"},
                        {"type": "hf-safetensors", "model_type": hf.get("model_type")})


def _record(layout: RecordLayout, w13: torch.Tensor, w2: torch.Tensor, b13=None, b2=None) -> torch.Tensor:
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for part in layout.parts:
        weight = {"w13": w13, "w2": w2, "b13": b13, "b2": b2}[part.name]
        if weight is None:
            raise ConvertError(f"the record layout has a {part.name} part but the checkpoint gives none")
        rec[part.offset:part.offset + part.nbytes] = quantize(weight.reshape(part.shape), part.format)
    return rec
