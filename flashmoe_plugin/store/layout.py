"""Where each expert's weights sit inside its record (DESIGN.md section 6).

A record holds one routed expert: `w13` (gate and up projections stacked, [2I, H], gate rows
first) then `w2` ([H, I]); experts with biases (gpt-oss) add `b13` ([1, 2I]) and `b2` ([1, H])
in f32. Each part is laid out by quant.sections. Records are padded to
RECORD_ALIGN so that record e of a layer file starts at e * size and O_DIRECT reads work.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import quant

RECORD_ALIGN = 4096


@dataclass(frozen=True)
class Part:
    name: str
    offset: int
    format: str
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return quant.part_nbytes(self.format, self.shape)


@dataclass(frozen=True)
class RecordLayout:
    size: int
    parts: tuple[Part, ...]
    align: int = RECORD_ALIGN

    @classmethod
    def build(cls, fmt: str, hidden: int, intermediate: int, biases: bool = False,
              w2_format: str | None = None) -> "RecordLayout":
        """The layout the writer uses; w2_format where down differs from gate/up (GGUF's Q4_K_M
        keeps down in Q6_K)."""
        parts, off = [], 0
        spec = [("w13", fmt, (2 * intermediate, hidden)), ("w2", w2_format or fmt, (hidden, intermediate))]
        if biases:
            spec += [("b13", "f32", (1, 2 * intermediate)), ("b2", "f32", (1, hidden))]
        for name, f, shape in spec:
            p = Part(name, off, f, shape)
            parts.append(p)
            off = quant._align(off + p.nbytes)
        return cls(size=quant._align(off, RECORD_ALIGN), parts=tuple(parts))

    def has(self, name: str) -> bool:
        return any(p.name == name for p in self.parts)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"record has no part {name!r}")

    @property
    def format(self) -> str:
        return self.parts[0].format

    @property
    def hidden(self) -> int:
        return self.part("w2").shape[0]

    @property
    def intermediate(self) -> int:
        return self.part("w2").shape[1]

    def part_bytes(self, record, name: str):
        """The slice of a uint8 record tensor holding one part."""
        p = self.part(name)
        return record[p.offset:p.offset + p.nbytes]

    def to_json(self) -> dict:
        return {"size": self.size, "align": self.align,
                "parts": [{"name": p.name, "offset": p.offset, "format": p.format, "shape": list(p.shape)}
                          for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict) -> "RecordLayout":
        parts = tuple(Part(p["name"], int(p["offset"]), p["format"], tuple(p["shape"])) for p in d["parts"])
        return cls(size=int(d["size"]), parts=parts, align=int(d.get("align", RECORD_ALIGN)))
