"""GGUF file -> expert store, for users who want our checksummed layout or our formats.

--quant keep: the experts' llama.cpp blocks are copied as they are (every MoE layer must then use
the same block types, since a store has one record layout); none: F32/F16/BF16 experts kept
exactly; bf16|q8|q4|q2: dequantized (gguf-py's definition) and re-quantized with our
error-minimising scales. Dense tensors are stored dequantized in fp32. The vocabulary becomes
tokenizer.json (runtime/gguf_tokenizer.py). Written atomically through store.writer."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import quant as Q
from ..kernels.quantize import quantize
from ..store.format import StoreError
from ..store.layout import RecordLayout
from ..store.writer import StoreWriter
from .errors import ConvertError

GGUF_QUANT_CHOICES = ("keep", "none", "bf16", "q8", "q4", "q2")


def _read_record(store, layer: int, e: int, size: int) -> torch.Tensor:
    rec = torch.zeros(size, dtype=torch.uint8)
    for file, off, n, at, _ in store.record_reads(layer, e, verify=False):
        with open(file, "rb") as f:
            f.seek(off)
            data = f.read(n)
        if len(data) != n:
            raise ConvertError(f"{file}: layer {layer} expert {e}: unexpected end of file")
        rec[at:at + n] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return rec


def convert_gguf(src, dst, quant: str = "keep", force: bool = False, progress=None) -> Path:
    from ..runtime.gguf_tokenizer import VocabError, write_folder
    from ..store.gguf import GgufStore

    if quant not in GGUF_QUANT_CHOICES:
        raise ConvertError(f"unknown --quant {quant!r} for a GGUF source; choose one of {', '.join(GGUF_QUANT_CHOICES)}")
    try:
        store = GgufStore.open(src)
    except StoreError as e:
        raise ConvertError(str(e)) from None
    cfg = store.config
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    layouts = {l: store.layout_of(l) for l in cfg.moe_layers}
    formats = {(lay.part("w13").format, lay.part("w2").format) for lay in layouts.values()}
    if quant == "keep":
        if len(formats) > 1:
            raise ConvertError(f"{src}: the MoE layers mix expert block types {sorted(formats)}; a store has one "
                               f"record layout: pick --quant q8|q4|q2|bf16")
        layout = next(iter(layouts.values()))
    else:
        efmt = quant
        if quant == "none":
            if any(f not in Q.RAW_DTYPES for pair in formats for f in pair):
                raise ConvertError(f"{src}: experts are quantized ({sorted(formats)}); --quant none keeps only "
                                   f"F32/F16/BF16: use --quant keep or q8|q4|q2|bf16")
            efmt = formats.pop()[0]
        layout = RecordLayout.build(efmt, H, I, biases=cfg.expert_bias)
    total = len(cfg.moe_layers) * E
    with StoreWriter(dst, layout, force=force) as w:
        done = 0
        for layer in cfg.moe_layers:
            src_layout = layouts[layer]
            w.begin_layer(layer, E)
            for e in range(E):
                rec = _read_record(store, layer, e, src_layout.size)
                if quant != "keep":
                    out = torch.zeros(layout.size, dtype=torch.uint8)
                    for part in layout.parts:
                        sp = src_layout.part(part.name)
                        wf = Q.dequantize(src_layout.part_bytes(rec, part.name), sp.format, sp.shape)
                        out[part.offset:part.offset + part.nbytes] = quantize(wf, part.format)
                    rec = out
                w.write_record(rec)
                done += 1
                if progress:
                    progress(done, total)
        for name, t in sorted(store.load_dense().items()):
            w.add_dense(name, t)
        try:
            folder = write_folder(store.meta, w.tmp / ".vocab", str(src))
        except VocabError as e:
            raise ConvertError(str(e)) from None
        for f in ("tokenizer.json", "tokenizer_config.json"):
            os.replace(folder / f, w.tmp / f)
        os.rmdir(folder)
        return w.finish(cfg.architecture, cfg.to_json(),
                        {"format": layout.format, "group_size": Q.GROUP if layout.format in Q.QUANT_BITS else None,
                         "dense": "f32 (dequantized from the GGUF)"},
                        {"type": "gguf", "file": str(Path(src).resolve()), "quant": quant})
