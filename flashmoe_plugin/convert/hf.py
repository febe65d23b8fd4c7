"""HF checkpoint folder (config.json + *.safetensors + tokenizer files) -> expert store.

Streams tensor by tensor through safetensors' lazy reader: at most one expert's weights (plus
the dense part, which is small next to the experts) are in memory at a time. Per-expert
(`experts.{e}.w1`) and fused 3-D (`experts.gate_up_proj`) layouts, single files and sharded
checkpoints all produce byte-identical stores."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from .. import quant as Q
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


class Checkpoint:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ConvertError(f"{src}: no *.safetensors files")
        self.handles, self.where = {}, {}
        for f in files:
            path = src / f
            if not path.is_file():
                raise ConvertError(f"{path}: listed in model.safetensors.index.json but missing")
            try:
                h = safe_open(str(path), framework="pt")
                names = list(h.keys())
            except Exception as e:
                raise ConvertError(f"{path}: unreadable safetensors file ({e}); truncated or corrupt?") from None
            self._check_size(path, h, names)
            self.handles[f] = h
            for n in names:
                self.where[n] = f
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if self.where.get(n) != f]
            if missing:
                raise ConvertError(f"{src}: tensors in the index but not in their shard: {', '.join(missing[:3])}")

    @staticmethod
    def _check_size(path: Path, h, names):
        # safetensors checks the header, not that the data region is all there.
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + header_len + end:
            raise ConvertError(f"{path}: truncated ({path.stat().st_size} bytes, header promises {8 + header_len + end})")

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise ConvertError(f"{self.where[name]}: tensor {name}: cannot be read ({e})") from None

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype


def expert_format(quant: str, src_dtype: torch.dtype) -> str:
    if quant == "none":
        if src_dtype not in Q.DTYPE_FORMATS:
            raise ConvertError(f"source dtype {src_dtype} cannot be kept as is; pick --quant bf16|q8|q4|q2")
        return Q.DTYPE_FORMATS[src_dtype]
    if quant not in QUANT_CHOICES:
        raise ConvertError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    return quant


def convert_hf(src, dst, quant: str = "q4", force: bool = False, progress=None) -> Path:
    src = Path(src)
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

    def expert_weights(layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer, "w13") in fused:
            w13 = ckpt.get(fused[(layer, "w13")])
            w2 = ckpt.get(fused[(layer, "w2")]) if (layer, "w2") in fused else None
            if tuple(w13.shape) != (E, 2 * I, H):
                raise ConvertError(f"{fused[(layer, 'w13')]}: shape {tuple(w13.shape)}, expected {(E, 2 * I, H)}")
            if w2 is None or tuple(w2.shape) != (E, H, I):
                raise ConvertError(f"layer {layer}: fused down_proj missing or not of shape {(E, H, I)}")
            return w13[e], w2[e]
        parts = experts.get((layer, e), {})
        for which in ("w1", "w3", "w2"):
            if which not in parts:
                raise ConvertError(f"{src}: layer {layer} expert {e}: tensor {which} "
                                   f"({dict(zip(('w1', 'w3', 'w2'), arch.expert_names))[which]}) missing")
        w1, w3, w2 = (ckpt.get(parts[k]) for k in ("w1", "w3", "w2"))
        for t, shape, k in ((w1, (I, H), "w1"), (w3, (I, H), "w3"), (w2, (H, I), "w2")):
            if tuple(t.shape) != shape:
                raise ConvertError(f"{parts[k]}: shape {tuple(t.shape)}, expected {shape}")
        return torch.cat([w1, w3], dim=0), w2

    if not cfg.moe_layers:
        raise ConvertError(f"{cfg_path}: the model has no MoE layers")
    first = cfg.moe_layers[0]
    efmt = expert_format(quant, expert_weights(first, 0)[0].dtype)
    try:
        layout = RecordLayout.build(efmt, H, I)
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: experts of shape hidden {H} x intermediate {I} cannot be stored as "
                           f"{efmt}: {e}; use --quant none or bf16") from None
    total = len(cfg.moe_layers) * E
    with StoreWriter(dst, layout, force=force) as w:
        done = 0
        for layer in cfg.moe_layers:
            w.begin_layer(layer, E)
            for e in range(E):
                w13, w2 = expert_weights(layer, e)
                w.write_record(_record(layout, w13, w2))
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


def _record(layout: RecordLayout, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for part, weight in zip(layout.parts, (w13, w2)):
        rec[part.offset:part.offset + part.nbytes] = Q.quantize(weight, part.format)
    return rec
