"""The expert store, format version 1 (DESIGN.md section 6): opening, checking, verifying.

    STORE/manifest.json          format, version, architecture, config, quant, layers,
                                 expert_record, checksums (crc32c), source
    STORE/dense.safetensors      every tensor that is not a routed expert (memory-mapped)
    STORE/experts/layer_NNN.bin  E records of expert_record.size bytes, record e at e * size
    STORE/tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.base import ModelConfig
from .layout import RecordLayout

FORMAT = "flashmoe-store"
VERSION = 1
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
CHECKSUM = "crc32c"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "generation_config.json", "tokenizer.model")


class StoreError(ValueError):
    """A store that is missing, malformed or damaged; the message names the file and record."""


def layer_file_name(layer: int) -> str:
    return f"experts/layer_{layer:03d}.bin"


def crc32c(data, crc: int = 0) -> int:
    from .._io import crc32c as native
    return native(data, crc)


def file_crc32c(path: Path, chunk: int = 64 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = crc32c(block, crc)
    return crc


@dataclass
class LayerInfo:
    index: int
    file: str
    experts: int


class Store:
    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.config = ModelConfig.from_json(manifest["config"])
        self.layout = RecordLayout.from_json(manifest["expert_record"])
        self.layers = {int(l["index"]): LayerInfo(int(l["index"]), l["file"], int(l["experts"]))
                       for l in manifest["layers"]}
        sums = manifest["checksums"]
        self.record_crcs = {int(k): [int(c) for c in v] for k, v in sums.get("experts", {}).items()}

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def quant(self) -> str:
        return self.manifest["quant"]["format"]

    @property
    def expert_bytes(self) -> int:
        return sum(l.experts for l in self.layers.values()) * self.layout.size

    def layer_path(self, layer: int) -> Path:
        return self.path / self.layers[layer].file

    def layout_of(self, layer: int) -> RecordLayout:
        return self.layout  # one layout for every layer (a GGUF store may have one per layer)

    def record_reads(self, layer: int, expert: int, verify: bool = True) -> list[tuple]:
        """[(file, offset, nbytes, offset in the slot, crc32c or None)] filling one record."""
        size = self.layout.size
        return [(self.layer_path(layer), expert * size, size, 0, self.record_crcs[layer][expert] if verify else None)]

    @classmethod
    def open(cls, path) -> "Store":
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise StoreError(f"{path}: not a store folder (does not exist or is not a directory)")
        if not mpath.is_file():
            raise StoreError(f"{path}: no {MANIFEST}; not a flashmoe store (convert a model with `flashmoe convert`)")
        try:
            manifest = json.loads(mpath.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise StoreError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{mpath}: not a JSON object")
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise StoreError(f"{mpath}: store version {manifest.get('version')!r}; this flashmoe reads version {VERSION}")
        from .validate import validate_manifest
        validate_manifest(manifest, mpath)  # every field, before anything trusts one
        try:
            store = cls(path, manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{mpath}: malformed ({e})") from None
        store.check_files()
        return store

    def check_files(self):
        """Cheap structural check at open: every file exists with the size the manifest implies."""
        if not (self.path / DENSE).is_file():
            raise StoreError(f"{self.path / DENSE}: missing")
        for l in self.layers.values():
            p, want = self.path / l.file, l.experts * self.layout.size
            if not p.is_file():
                raise StoreError(f"{p}: missing expert file of layer {l.index}")
            if p.stat().st_size != want:
                raise StoreError(f"{p}: {p.stat().st_size} bytes, expected {want} "
                                 f"({l.experts} records of {self.layout.size}); truncated or foreign file")
            if len(self.record_crcs.get(l.index, [])) != l.experts:
                raise StoreError(f"{self.path / MANIFEST}: checksums of layer {l.index} missing or incomplete")

    def load_dense(self, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(self.path / DENSE), device="cpu")
        except Exception as e:
            raise StoreError(f"{self.path / DENSE}: cannot be read ({e})") from None
        if dtype is not None or str(device) != "cpu":
            tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
        return tensors

    def verify(self, progress=None) -> list[str]:
        """Check every checksum; returns a list of problems (empty when the store is intact)."""
        problems = []
        dense_crc = self.manifest["checksums"].get("dense")
        if dense_crc is not None and file_crc32c(self.path / DENSE) != int(dense_crc):
            problems.append(f"{DENSE}: checksum mismatch")
        size = self.layout.size
        for l in sorted(self.layers.values(), key=lambda l: l.index):
            with open(self.path / l.file, "rb") as f:
                for e in range(l.experts):
                    rec = f.read(size)
                    if crc32c(rec) != self.record_crcs[l.index][e]:
                        problems.append(f"{l.file}: layer {l.index} expert {e}: checksum mismatch")
                    if progress:
                        progress(1)
        return problems
