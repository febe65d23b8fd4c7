"""Validation of a store's manifest at open, before any read: every field a reader, the pager or a
kernel will trust is checked here, and a forged or damaged manifest is a StoreError naming the
field (e.g. `layers[3].file`), never an IndexError, an OverflowError or NaNs later.

    validate_manifest(manifest, where)      the whole manifest.json (dict) of a store folder
    check_config(config, where)             a normalised ModelConfig dict (any store kind)
    check_layout(record, config, where)     an expert_record against the config's shapes
    check_relative_path(name, where)        a file named by a manifest stays inside the store

Each check takes `where` (the file, for messages) and raises StoreError. Sizes are bounded by
MAX_BYTES so that nothing downstream allocates or offsets by a forged number.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from .. import quant, quant_gguf
from .format import StoreError

MAX_BYTES = 1 << 48          # no record, part or file of a real model comes near 256 TiB
MAX_COUNT = 1 << 20          # experts per layer, layers, heads, vocabulary ...
CRC_MAX = 0xFFFFFFFF


def _int(value, field: str, where, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"{where}: field {field!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise StoreError(f"{where}: field {field!r} is {value}, outside [{lo}, {hi}]")
    return value


def _get(d, key, field: str, where):
    if not isinstance(d, dict):
        raise StoreError(f"{where}: field {field.rsplit('.', 1)[0]!r} must be an object")
    if key not in d:
        raise StoreError(f"{where}: missing field {field!r}")
    return d[key]


def check_relative_path(name, field: str, where, prefix: str | None = None) -> str:
    """A path a manifest names must be relative, without `..`, and (with prefix) under it: a
    forged store must not make us open /etc/hostname or ../../secret."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise StoreError(f"{where}: field {field!r} must be a relative file name, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or (prefix is not None and p.parts[:1] != (prefix,)):
        raise StoreError(f"{where}: field {field!r} is {name!r}: files must lie inside the store"
                         + (f" under {prefix}/" if prefix else ""))
    return name


def check_config(c, where) -> None:
    """The normalised config: positive sizes, top_k within the experts, MoE layers in range."""
    if not isinstance(c, dict):
        raise StoreError(f"{where}: field 'config' must be an object")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "top_k", "moe_intermediate_size"):
        _int(_get(c, key, f"config.{key}", where), f"config.{key}", where, 1, MAX_COUNT)
    for key in ("dense_intermediate_size", "shared_expert_intermediate_size"):
        if key in c:
            _int(c[key], f"config.{key}", where, 0, MAX_COUNT)
    if c["top_k"] > c["num_experts"]:
        raise StoreError(f"{where}: field 'config.top_k' is {c['top_k']}, more than "
                         f"config.num_experts ({c['num_experts']})")
    if c["num_heads"] % c["num_kv_heads"]:
        raise StoreError(f"{where}: field 'config.num_heads' ({c['num_heads']}) is not a multiple "
                         f"of config.num_kv_heads ({c['num_kv_heads']})")
    moe = _get(c, "moe_layers", "config.moe_layers", where)
    if not isinstance(moe, list):
        raise StoreError(f"{where}: field 'config.moe_layers' must be a list")
    for i, layer in enumerate(moe):
        _int(layer, f"config.moe_layers[{i}]", where, 0, c["num_layers"] - 1)
    for key in ("rms_norm_eps", "rope_theta"):
        v = _get(c, key, f"config.{key}", where)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise StoreError(f"{where}: field 'config.{key}' must be a positive number, got {v!r}")


def check_layout(record, c, quant_format, where) -> None:
    """The record layout must be exactly what the writer builds for the config's shapes and the
    declared format: this catches offsets or sizes outside the record, overflowing numbers and
    bytes of one format declared as another (q4 read as q2 computes NaNs)."""
    from .layout import RecordLayout

    size = _int(_get(record, "size", "expert_record.size", where), "expert_record.size", where, 1)
    align = _int(record.get("align", 4096), "expert_record.align", where, 1)
    parts = _get(record, "parts", "expert_record.parts", where)
    if not isinstance(parts, list) or not parts:
        raise StoreError(f"{where}: field 'expert_record.parts' must be a non-empty list")
    fmts = {}
    for i, p in enumerate(parts):
        f = f"expert_record.parts[{i}]"
        _int(_get(p, "offset", f + ".offset", where), f + ".offset", where)
        fmt = _get(p, "format", f + ".format", where)
        if fmt not in quant.FORMATS and not quant_gguf.is_block_format(fmt):
            raise StoreError(f"{where}: field {f + '.format'!r} is {fmt!r}; known: "
                             f"{', '.join(quant.FORMATS + tuple(quant_gguf.BLOCK_FORMATS))}")
        shape = _get(p, "shape", f + ".shape", where)
        if not isinstance(shape, list) or len(shape) != 2:
            raise StoreError(f"{where}: field {f + '.shape'!r} must be [rows, cols], got {shape!r}")
        for k, n in enumerate(shape):
            _int(n, f"{f}.shape[{k}]", where, 1, MAX_COUNT)
        fmts[p.get("name")] = fmt
    if "w13" not in fmts or "w2" not in fmts:
        raise StoreError(f"{where}: field 'expert_record.parts' must name parts w13 and w2")
    fmt = fmts["w13"]
    if quant_format in quant.QUANT_BITS and (fmt != quant_format or fmts["w2"] != quant_format):
        raise StoreError(f"{where}: field 'expert_record.parts[0].format' is {fmt!r} but field "
                         f"'quant.format' says {quant_format!r}")
    try:
        want = RecordLayout.build(fmt, c["hidden_size"], c["moe_intermediate_size"],
                                  biases=bool(c.get("expert_bias")), w2_format=fmts["w2"])
    except ValueError as e:
        raise StoreError(f"{where}: field 'expert_record' does not fit config.hidden_size and "
                         f"config.moe_intermediate_size for format {fmt!r} ({e})") from None
    if align != want.align or size != want.size:
        raise StoreError(f"{where}: field 'expert_record.size' is {size} (align {align}); a {fmt} "
                         f"record of these shapes is {want.size} bytes (align {want.align})")
    got = RecordLayout.from_json(record)
    for i, (p, w) in enumerate(zip(got.parts, want.parts)):
        if (p.name, p.offset, p.shape) != (w.name, w.offset, w.shape):
            raise StoreError(
                f"{where}: field 'expert_record.parts[{i}]' is {p.name} at offset {p.offset} of shape "
                f"{list(p.shape)}; a {fmt} record of these shapes has {w.name} at {w.offset} of shape "
                f"{list(w.shape)} (it must lie inside the record of {size} bytes)")
    if len(got.parts) != len(want.parts):
        raise StoreError(f"{where}: field 'expert_record.parts' has {len(got.parts)} parts, expected "
                         f"{len(want.parts)} ({', '.join(p.name for p in want.parts)})")


def check_layers(layers, c, checksums, where) -> None:
    """Every MoE layer once, with config.num_experts records, its file under experts/, and one
    crc32c per record."""
    if not isinstance(layers, list):
        raise StoreError(f"{where}: field 'layers' must be a list")
    if not isinstance(checksums, dict):
        raise StoreError(f"{where}: field 'checksums' must be an object")
    experts = checksums.get("experts", {})
    if not isinstance(experts, dict):
        raise StoreError(f"{where}: field 'checksums.experts' must be an object")
    seen = set()
    for i, l in enumerate(layers):
        f = f"layers[{i}]"
        idx = _int(_get(l, "index", f + ".index", where), f + ".index", where, 0, c["num_layers"] - 1)
        if idx in seen:
            raise StoreError(f"{where}: field {f + '.index'!r}: layer {idx} appears twice")
        seen.add(idx)
        n = _int(_get(l, "experts", f + ".experts", where), f + ".experts", where, 0, MAX_COUNT)
        if n != c["num_experts"]:
            raise StoreError(f"{where}: field {f + '.experts'!r} is {n}; config.num_experts is "
                             f"{c['num_experts']}")
        check_relative_path(_get(l, "file", f + ".file", where), f + ".file", where, prefix="experts")
        crcs = experts.get(str(idx))
        if not isinstance(crcs, list) or len(crcs) != n:
            raise StoreError(f"{where}: field 'checksums.experts.{idx}' must list {n} checksums of layer {idx}")
        for e, crc in enumerate(crcs):
            _int(crc, f"checksums.experts.{idx}[{e}]", where, 0, CRC_MAX)
    moe = set(c["moe_layers"])
    if seen != moe:
        raise StoreError(f"{where}: field 'layers' covers layers {sorted(seen)}; config.moe_layers "
                         f"is {sorted(moe)}")
    if "dense" in checksums and checksums["dense"] is not None:
        _int(checksums["dense"], "checksums.dense", where, 0, CRC_MAX)


def validate_manifest(m, where) -> None:
    """The whole manifest of a store folder (format and version are checked by the caller)."""
    if not isinstance(m, dict):
        raise StoreError(f"{where}: the manifest must be a JSON object")
    for key in ("architecture", "config", "quant", "layers", "expert_record", "checksums"):
        if key not in m:
            raise StoreError(f"{where}: missing field {key!r}")
    if not isinstance(m["architecture"], str):
        raise StoreError(f"{where}: field 'architecture' must be a string")
    check_config(m["config"], where)
    q = m["quant"]
    if not isinstance(q, dict) or not isinstance(q.get("format"), str):
        raise StoreError(f"{where}: field 'quant.format' must be a string")
    check_layout(m["expert_record"], m["config"], q["format"], where)
    check_layers(m["layers"], m["config"], m["checksums"], where)
