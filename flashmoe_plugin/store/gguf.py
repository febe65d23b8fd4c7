"""A GGUF file read in place as an expert store: the same reader interface as format.Store,
over extents inside the file (DESIGN.md section 6). No conversion, no copy.

An expert of a stacked `blk.N.ffn_{gate,up,down}_exps` tensor is one contiguous byte range per
tensor (the expert is the outermost dimension), so a record is three reads into one slot:

    slot: [gate rows | up rows] = part w13 [2I, H] | pad to 64 | part w2 [H, I] (down)

in llama.cpp's block format as it lies in the file (quant_gguf.py). Down may have another type
than gate/up (Q4_K_M mixes Q4_K and Q6_K), so the layout is per layer (`layout_of(layer)`);
slots are sized for the largest. Metadata, tensor infos and the vocabulary come from gguf-py's
GGUFReader (never a hand parser); every tensor's extent is checked against its file at open.

Integrity: GGUF has no checksums. `write_index()` (`flashmoe inspect --index`) computes a
crc32c per extent into a sidecar index in the sidecar folder (`path`, in the user cache), and
reads are verified against it when it is present. Sharded files (`-00001-of-0000N.gguf`) are
opened from the first shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import quant, quant_gguf
from ..models import gguf as names
from ..models.base import ConfigError
from .format import LayerInfo, StoreError, crc32c
from .layout import RECORD_ALIGN, Part, RecordLayout

INDEX = "gguf_index.json"
SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def is_gguf(path) -> bool:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def shard_paths(path: Path) -> list[Path]:
    m = SHARD.match(path.name)
    if not m:
        return [path]
    if int(m.group("i")) != 1:
        raise StoreError(f"{path}: shard {int(m.group('i'))} of {int(m.group('n'))}; open the first shard (-00001-of-...)")
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in paths:
        if not p.is_file():
            raise StoreError(f"{p}: missing shard of the split GGUF {path.name}")
    return paths


def cache_root() -> Path:
    env = os.environ.get("FLASHMOE_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashmoe"


@dataclass(frozen=True)
class Tensor:
    name: str
    type: int           # GGML type id
    shape: tuple        # numpy order: rows first (GGUF's ne reversed)
    file: Path
    offset: int         # absolute, in file
    nbytes: int


def _field_value(field):
    from gguf import GGUFValueType
    v = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY and isinstance(v, list) and v \
            and isinstance(v[0], (bytes, bytearray)):
        return [bytes(x).decode("utf-8", "replace") for x in v]
    return v


class Metadata:
    """The GGUF key/value metadata as a read-only mapping, each value converted on first use
    (a 150k-token vocabulary is costly to turn into Python lists; most opens never need it)."""

    def __init__(self, fields):
        self._fields = {k: f for k, f in fields.items() if not k.startswith("GGUF.")}
        self._values: dict = {}

    def __getitem__(self, key):
        if key not in self._values:
            try:
                self._values[key] = _field_value(self._fields[key])
            except (ValueError, IndexError, TypeError) as e:  # undecodable text, forged lengths
                raise StoreError(f"GGUF metadata key {key!r} cannot be read: {e.__class__.__name__}: {e}") from None
        return self._values[key]

    def get(self, key, default=None):
        return self[key] if key in self._fields else default

    def __contains__(self, key) -> bool:
        return key in self._fields

    def keys(self):
        return self._fields.keys()


def _reader(path: Path):
    """gguf-py's GGUFReader, with every tensor's extent checked against the file first, so that a
    truncated file or a forged offset/size is reported by tensor name."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Checked(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise StoreError(f"{path}: tensor {name}: unknown GGML type id {int(raw_dtype[0])}") from None
                blk, tsize = GGML_QUANT_SIZES[qtype]
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                if int(dims[0]) % blk:
                    raise StoreError(f"{path}: tensor {name}: {int(dims[0])} columns is not a multiple of "
                                     f"the {qtype.name} block of {blk}")
                start = int(start_offs) + int(offset_tensor[0])
                if start % self.alignment or start + n * tsize // blk > size:
                    raise StoreError(f"{path}: tensor {name}: data [{start}, {start + n * tsize // blk}) lies "
                                     f"{'outside' if start + n * tsize // blk > size else 'misaligned in'} the "
                                     f"file of {size} bytes: truncated or forged offset/shape")
            return super()._build_tensors(start_offs, fields)

    try:
        return Checked(str(path), "r")
    except StoreError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as e:
        raise StoreError(f"{path}: not a readable GGUF file ({e})") from None


class GgufStore:
    """The Store interface over one GGUF model (possibly split into shards)."""

    direct_io = False  # extents are 32-byte aligned at best: read buffered

    def __init__(self, file: Path):
        self.file = Path(file)
        self.files = shard_paths(self.file)
        self.readers = [_reader(p) for p in self.files]
        self.meta = Metadata(self.readers[0].fields)
        self.tensors: dict[str, Tensor] = {}
        for p, r in zip(self.files, self.readers):
            for t in r.tensors:
                self.tensors[t.name] = Tensor(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())),
                                              p, int(t.data_offset), int(t.n_bytes))
        where = str(self.file)
        try:
            self.arch_key, _ = names.family(self.meta, where)
            self.config = names.config_from_gguf(self.meta, {k: t.shape for k, t in self.tensors.items()}, where)
        except ConfigError as e:
            raise StoreError(str(e)) from None
        self._check_names()
        self._extents: dict[int, list] = {}  # layer -> [(tensor, offset in the slot)] for gate, up, down
        self.layer_layouts = {l: self._layer_layout(l) for l in self.config.moe_layers}
        self.layout = max(self.layer_layouts.values(), key=lambda lay: lay.size)
        E = self.config.num_experts
        self.layers = {l: LayerInfo(l, str(self.tensors[f"blk.{l}.ffn_gate_exps.weight"].file), E)
                       for l in self.config.moe_layers}
        # keyed by path and size (not mtime: a file damaged in place must meet its old checksums)
        key = hashlib.sha1(f"{self.file.resolve()}|{self.file.stat().st_size}".encode()).hexdigest()[:12]
        self.path = cache_root() / "gguf" / f"{self.file.stem}-{key}"  # sidecar folder (made when written)
        self.record_crcs = self._load_index()
        types = sorted({quant_gguf.format_of_type(t.type) or str(t.type) for t in self.tensors.values()
                        if t.name.endswith("_exps.weight")})
        version = self.readers[0].fields["GGUF.version"].contents()
        self.manifest = {"format": "gguf", "version": version, "architecture": self.config.architecture,
                         "config": self.config.to_json(), "quant": {"format": "+".join(types)},
                         "source": {"type": "gguf", "path": str(self.file), "shards": len(self.files)}}

    # ------------------------------------------------------------------ the Store interface
    @classmethod
    def open(cls, path) -> "GgufStore":
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no such GGUF file")
        return cls(path)

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def quant(self) -> str:
        return self.manifest["quant"]["format"]

    @property
    def expert_bytes(self) -> int:
        return sum(l.experts for l in self.layers.values()) * self.layout.size

    @property
    def dense_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values() if names.classify(t.name, self.arch_key)[0] == "dense")

    def dense_bytes_per_token(self) -> int:
        """The dense tensors' bytes in the file, with one row of the embedding table."""
        emb = self.tensors["token_embd.weight"]
        return self.dense_bytes - emb.nbytes + (0 if self.config.tie_word_embeddings else emb.nbytes // emb.shape[0])

    @property
    def record_bytes(self) -> int:
        """Bytes one expert's extents hold (what a read of a record moves), the largest layer's."""
        return max(sum(t.nbytes for t, _ in ext) // self.config.num_experts for ext in self._extents.values())

    def layout_of(self, layer: int) -> RecordLayout:
        return self.layer_layouts[layer]

    def layer_path(self, layer: int) -> Path:
        return Path(self.layers[layer].file)

    def record_reads(self, layer: int, expert: int, verify: bool = True) -> list[tuple]:
        """[(file, offset, nbytes, offset in the slot, crc32c or None)] filling one record."""
        crcs = self.record_crcs.get(layer) if verify else None
        out = []
        for j, (t, at) in enumerate(self._extents[layer]):
            n = t.nbytes // self.config.num_experts
            out.append((t.file, t.offset + expert * n, n, at, crcs[expert][j] if crcs else None))
        return out

    def check_files(self):
        pass  # every extent was checked against its file at open

    def load_dense(self, device="cpu", dtype: torch.dtype | None = None, keep: bool = False) -> dict:
        """Every non-expert tensor as a float tensor under its canonical name (quantized ones
        dequantized with gguf-py, the reference llama.cpp's own Python defines). With keep, the
        2-D tensors in a llama.cpp block format come as quant.Packed (their blocks copied as
        they lie in the file, rows reordered where fix_dense reorders them), on the CPU."""
        import numpy as np
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = {}
        data = {t.name: t for r in self.readers for t in r.tensors}
        for name, t in self.tensors.items():
            kind = names.classify(name, self.arch_key)
            if kind[0] != "dense":
                continue
            fmt = quant_gguf.format_of_type(t.type)
            if (keep and len(t.shape) == 2 and fmt is not None and quant_gguf.is_block_format(fmt)
                    and names.rows_only(kind[1])):
                raw = torch.from_numpy(np.array(data[name].data, dtype=np.uint8)).reshape(t.shape[0], -1)
                raw = names.fix_dense(kind[1], raw, self.config, self.arch_key)
                out[kind[1]] = quant.Packed(raw.contiguous().reshape(-1), fmt, tuple(t.shape))
                continue
            try:
                w = dequantize(data[name].data, GGMLQuantizationType(t.type))
            except NotImplementedError:
                raise StoreError(f"{self.file}: tensor {name}: type {GGMLQuantizationType(t.type).name} "
                                 f"is not supported") from None
            w = torch.from_numpy(np.array(w, dtype=np.float32)).reshape(t.shape)  # a copy: the file stays read-only
            w = names.fix_dense(kind[1], w, self.config, self.arch_key)
            out[kind[1]] = w.to(device=device, dtype=dtype or torch.float32)
        return names.finish_dense(out, self.config)

    def verify(self, progress=None) -> list[str]:
        """Check every extent against the sidecar index; [] when intact. Without an index there is
        nothing to check against: a StoreError says how to make one."""
        if not self.record_crcs:
            raise StoreError(f"{self.file}: GGUF has no checksums and no index was made for it; "
                             f"run `flashmoe inspect --index {self.file}` (on a copy you trust)")
        problems = []
        for layer, crcs in self._compute_crcs(progress).items():
            for e, (got, want) in enumerate(zip(crcs, self.record_crcs[layer])):
                if got != want:
                    problems.append(f"{self.file}: layer {layer} expert {e}: checksum mismatch")
        return problems

    def write_index(self, progress=None) -> Path:
        """Compute the crc32c of every expert extent into the sidecar index (atomically)."""
        crcs = self._compute_crcs(progress)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"file": str(self.file), "checksum": "crc32c", "experts": crcs}))
        os.replace(tmp, self.path / INDEX)
        self.record_crcs = {int(k): v for k, v in crcs.items()}
        return self.path / INDEX

    # ------------------------------------------------------------------ internals
    def _check_names(self):
        E = self.config.num_experts
        for name, t in self.tensors.items():
            kind = names.classify(name, self.arch_key)
            if kind[0] == "unknown":
                raise StoreError(f"{self.file}: tensor {name} is not known for {self.arch_key}")
            if kind[0] == "experts" and kind[2].startswith("w") and (len(t.shape) != 3 or t.shape[0] != E):
                raise StoreError(f"{self.file}: tensor {name}: shape {list(t.shape)}, expected [{E}, rows, cols]")
            if kind[0] == "experts" and kind[2].startswith("b") and (len(t.shape) != 2 or t.shape[0] != E
                                                                    or t.type != 0):
                raise StoreError(f"{self.file}: tensor {name}: expected an F32 [{E}, n] bias, got type {t.type} "
                                 f"shape {list(t.shape)}")

    def _layer_layout(self, layer: int) -> RecordLayout:
        t = {w: self.tensors.get(f"blk.{layer}.ffn_{n}_exps.weight") for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}
        for w, n in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            if t[w] is None:
                raise StoreError(f"{self.file}: tensor blk.{layer}.ffn_{n}_exps.weight is missing")
            if quant_gguf.format_of_type(t[w].type) is None:
                from gguf import GGMLQuantizationType
                raise StoreError(f"{self.file}: tensor {t[w].name}: type {GGMLQuantizationType(t[w].type).name} "
                                 f"is not supported for experts (supported: F32, F16, BF16, "
                                 f"{', '.join(k.upper() for k in quant_gguf.BLOCK_FORMATS)})")
        if t["w1"].type != t["w3"].type or t["w1"].shape != t["w3"].shape:
            raise StoreError(f"{self.file}: layer {layer}: ffn_gate_exps and ffn_up_exps differ in type or shape")
        _, inter, hidden = t["w1"].shape
        if t["w2"].shape[1:] != (hidden, inter):
            raise StoreError(f"{self.file}: tensor {t['w2'].name}: shape {list(t['w2'].shape)}, expected "
                             f"[E, {hidden}, {inter}]")
        f13, f2 = quant_gguf.format_of_type(t["w1"].type), quant_gguf.format_of_type(t["w2"].type)
        w13 = Part("w13", 0, f13, (2 * inter, hidden))
        w2 = Part("w2", quant._align(w13.nbytes), f2, (hidden, inter))
        self._extents[layer] = [(t["w1"], 0), (t["w3"], w13.nbytes // 2), (t["w2"], w2.offset)]
        parts, end = [w13, w2], w2.offset + w2.nbytes
        bias = {b: self.tensors.get(f"blk.{layer}.ffn_{n}_exps.bias") for b, n in (("b1", "gate"), ("b3", "up"), ("b2", "down"))}
        if any(bias.values()):  # gpt-oss: b13 = [gate bias | up bias], b2, f32 as in the file
            if not all(bias.values()) or bias["b1"].shape[1:] != (inter,) or bias["b2"].shape[1:] != (hidden,):
                raise StoreError(f"{self.file}: layer {layer}: expert biases ffn_{{gate,up,down}}_exps.bias must all "
                                 f"be present, of [E, {inter}], [E, {inter}] and [E, {hidden}]")
            b13 = Part("b13", quant._align(end), "f32", (1, 2 * inter))
            b2 = Part("b2", quant._align(b13.offset + b13.nbytes), "f32", (1, hidden))
            self._extents[layer] += [(bias["b1"], b13.offset), (bias["b3"], b13.offset + 4 * inter), (bias["b2"], b2.offset)]
            parts, end = parts + [b13, b2], b2.offset + b2.nbytes
        return RecordLayout(size=quant._align(end, RECORD_ALIGN), parts=tuple(parts))

    def _compute_crcs(self, progress=None) -> dict[int, list[list[int]]]:
        out = {}
        for layer in self.layers:
            rows = []
            for e in range(self.config.num_experts):
                row = []
                for file, off, n, _, _ in self.record_reads(layer, e, verify=False):
                    with open(file, "rb") as f:
                        f.seek(off)
                        row.append(crc32c(f.read(n)))
                rows.append(row)
                if progress:
                    progress(1)
            out[layer] = rows
        return out

    def _load_index(self) -> dict[int, list[list[int]]]:
        p = self.path / INDEX
        if not p.is_file():
            return {}
        try:
            crcs = {int(k): v for k, v in json.loads(p.read_text())["experts"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{p}: malformed checksum index ({e}); delete it or rebuild with "
                             f"`flashmoe inspect --index {self.file}`") from None
        for layer, info in self.layers.items():
            if len(crcs.get(layer, [])) != info.experts:
                raise StoreError(f"{p}: checksum index lacks layer {layer}; rebuild it with `flashmoe inspect --index`")
        return crcs
