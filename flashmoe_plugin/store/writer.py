"""Writes a store atomically: everything goes to a hidden temporary folder beside DST, which is
renamed into place only when complete, so a half-written store never looks valid."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import format as fmt
from .layout import RecordLayout


class StoreWriter:
    def __init__(self, dst, layout: RecordLayout, force: bool = False):
        self.dst = Path(dst)
        if self.dst.exists() and not force:
            raise FileExistsError(f"{self.dst}: already exists (use --force to replace it)")
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{os.getpid()}"
        self.force, self.layout = force, layout
        self.layers: list[dict] = []
        self.crcs: dict[str, list[int]] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self._file = None
        self._layer = None

    def __enter__(self):
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._drop_stale()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / "experts").mkdir(parents=True)
        return self

    def _drop_stale(self):
        """Remove what a killed earlier run of this DST left (its process is gone): a rerun
        needs no manual cleanup."""
        for p in self.dst.parent.glob(f".{self.dst.name}.partial-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if self._file:
            self._file.close()
        if exc_type is not None and self.tmp.exists():
            shutil.rmtree(self.tmp)
        return False

    # -- experts: one layer at a time, records in expert order
    def begin_layer(self, layer: int, n_experts: int):
        self.end_layer()
        name = fmt.layer_file_name(layer)
        self._file = open(self.tmp / name, "wb")
        self._layer = {"index": layer, "file": name, "experts": n_experts, "written": 0}
        self.crcs[str(layer)] = []

    def write_record(self, record: torch.Tensor | bytes | memoryview):
        data = memoryview(record.numpy()) if isinstance(record, torch.Tensor) else memoryview(record)
        if data.nbytes > self.layout.size:
            raise ValueError(f"record of {data.nbytes} bytes exceeds the layout's {self.layout.size}")
        pad = self.layout.size - data.nbytes
        crc = fmt.crc32c(data)
        if pad:
            zeros = bytes(pad)
            crc = fmt.crc32c(zeros, crc)
        self._file.write(data)
        if pad:
            self._file.write(zeros)
        self.crcs[str(self._layer["index"])].append(crc)
        self._layer["written"] += 1

    def end_layer(self):
        if self._layer is None:
            return
        l = self._layer
        if l["written"] != l["experts"]:
            raise ValueError(f"layer {l['index']}: wrote {l['written']} of {l['experts']} expert records")
        self._file.close()
        self._file, self._layer = None, None
        self.layers.append({k: l[k] for k in ("index", "file", "experts")})

    # -- dense tensors and side files
    def add_dense(self, name: str, tensor: torch.Tensor):
        if name in self.dense:
            raise ValueError(f"dense tensor {name!r} given twice")
        self.dense[name] = tensor.contiguous()

    def copy_file(self, src: Path, name: str | None = None):
        shutil.copyfile(src, self.tmp / (name or src.name))

    def finish(self, architecture: str, config: dict, quant: dict, source: dict, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        self.end_layer()
        save_file(dict(sorted(self.dense.items())), str(self.tmp / fmt.DENSE))
        os.chmod(self.tmp / fmt.DENSE, 0o644)  # safetensors creates it private; a store is shared data
        manifest = {
            "format": fmt.FORMAT, "version": fmt.VERSION, "architecture": architecture, "config": config,
            "quant": quant, "layers": sorted(self.layers, key=lambda l: l["index"]),
            "expert_record": self.layout.to_json(),
            "checksums": {"algorithm": fmt.CHECKSUM,
                          "dense": fmt.file_crc32c(self.tmp / fmt.DENSE),
                          "experts": self.crcs},
            "source": source, **(extra or {}),
        }
        (self.tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for p in self.tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if self.dst.exists():  # --force: move the old store aside, then drop it once the new one is in place
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.rename(self.dst, old)
        os.rename(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return self.dst


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
