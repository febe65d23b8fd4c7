"""Storage readers, registered through `register_storage`: `native` (the C reader, io.Reader) and
`faulty`, the same reader with faults injected, to test what the pager, the engine and the
adapters do when a disk misbehaves (a laptop's external SSD, a half-downloaded file).

    Engine(store, storage="faulty", storage_options={"faults": "eio@0:3#1-2,flip@*:*#1"})
    FLASHMOE_FAULTS="rate=0.02,seed=7" flashmoe run STORE --storage faulty -p "..."

A spec is a comma-separated list of rules `KIND[=MS]@LAYER:EXPERT[#NTH]`: LAYER and EXPERT are
numbers or `*`; NTH picks which reads of that record fail (`3`, `1-4`, `*`; default every read).
Kinds: `eio` (the read fails with EIO), `short` (end of file before the record ends), `flip` (one
bit of the bytes read is flipped: only the checksum can tell), `delay=MS` (the read completes MS
milliseconds late). `rate=P` adds a fault to each read with probability P (its kind drawn from
`kinds=eio+short+flip+delay`, default all), `seed=S` makes that reproducible. A record is
(layer, offset // nbytes): layer from the file name `layer_NNN.bin`, as the store names them.
"""
from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

from ..hookspecs import hookimpl
from ..io import ChecksumError, ReadError, Reader, crc32c

KINDS = ("eio", "short", "flip", "delay")
_RULE = re.compile(r"^(eio|short|flip|delay)(?:=(\d+))?@(\*|\d+):(\*|\d+)(?:#(\*|\d+(?:-\d+)?))?$")


@dataclass(frozen=True)
class Rule:
    kind: str
    ms: int
    layer: int | None
    expert: int | None
    nth: tuple[int, int] | None  # inclusive range of 1-based read counts; None = every read

    def matches(self, layer: int, expert: int, nth: int) -> bool:
        return ((self.layer is None or self.layer == layer) and (self.expert is None or self.expert == expert)
                and (self.nth is None or self.nth[0] <= nth <= self.nth[1]))


def parse_faults(spec: str) -> tuple[list[Rule], float, int, tuple[str, ...]]:
    """-> (rules, rate, seed, kinds for the random rate); ValueError naming the bad item."""
    rules, rate, seed, kinds = [], 0.0, 0, KINDS
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        if item.startswith("rate="):
            rate = float(item[5:])
            if not 0 <= rate <= 1:
                raise ValueError(f"faults: rate must be in [0, 1], got {item!r}")
        elif item.startswith("seed="):
            seed = int(item[5:])
        elif item.startswith("kinds="):
            kinds = tuple(item[6:].split("+"))
            if not kinds or any(k not in KINDS for k in kinds):
                raise ValueError(f"faults: {item!r}: kinds are {', '.join(KINDS)}")
        else:
            m = _RULE.match(item)
            if not m:
                raise ValueError(f"faults: cannot parse {item!r}; expected KIND[=MS]@LAYER:EXPERT[#NTH], "
                                 f"rate=P, seed=S or kinds=K+K (kinds: {', '.join(KINDS)})")
            kind, ms, layer, expert, nth = m.groups()
            if nth in (None, "*"):
                rng = None
            else:
                lo, _, hi = nth.partition("-")
                rng = (int(lo), int(hi or lo))
            rules.append(Rule(kind, int(ms or 50), None if layer == "*" else int(layer),
                              None if expert == "*" else int(expert), rng))
    return rules, rate, seed, kinds


class FaultyReader:
    """io.Reader's interface (open, submit, read, close, ...) over a real Reader, with faults.
    `injected` counts the faults by kind; `log` lists (layer, expert, nth, kind or None) per read."""

    def __init__(self, nthreads: int = 4, direct: bool = False, chunk_bytes: int = 1 << 20, faults: str | None = None):
        self.inner = Reader(nthreads=nthreads, direct=direct, chunk_bytes=chunk_bytes)
        spec = os.environ.get("FLASHMOE_FAULTS", "") if faults is None else faults
        self.rules, self.rate, seed, self.kinds = parse_faults(spec)
        self.rnd = random.Random(seed)
        self.layer_of: dict[int, int] = {}
        self.reads: Counter = Counter()
        self.injected: Counter = Counter()
        self.log: list = []
        self._lock = threading.Lock()

    def __getattr__(self, name):  # close_file, path, is_direct, file_size, evict, nthreads, ...
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self, path, direct=None) -> int:
        fid = self.inner.open(path, direct)
        m = re.search(r"layer_(\d+)\.bin$", os.fspath(path))
        self.layer_of[fid] = int(m.group(1)) if m else -1
        return fid

    def _fault(self, fid: int, offset: int, nbytes: int):
        layer, expert = self.layer_of.get(fid, -1), offset // nbytes if nbytes else 0
        with self._lock:
            self.reads[layer, expert] += 1
            nth = self.reads[layer, expert]
            rule = next((r for r in self.rules if r.matches(layer, expert, nth)), None)
            if rule is None and self.rate and self.rnd.random() < self.rate:
                kind = self.rnd.choice(self.kinds)
                rule = Rule(kind, self.rnd.randint(1, 50), layer, expert, None)
            if rule is not None:
                self.injected[rule.kind] += 1
            self.log.append((layer, expert, nth, rule and rule.kind))
            return rule, self.rnd.getrandbits(32)

    def submit(self, requests, priority: int = 0) -> "FaultyTicket":
        requests = [tuple(q) for q in requests]
        faults, real = [], []
        for q in requests:
            rule, bits = self._fault(q[0], q[1], q[2])
            faults.append((rule, bits))
            # a flipped read is verified here, after the flip, as the disk would have returned it
            real.append(q[:4] + (None,) if rule is not None and rule.kind == "flip" else q)
        ok = [q for q, (rule, _) in zip(real, faults) if rule is None or rule.kind not in ("eio", "short")]
        return FaultyTicket(self, requests, faults, self.inner.submit(ok, priority))

    def read(self, requests, priority: int = 0):
        self.submit(requests, priority).wait()


class FaultyTicket:
    """io.Ticket's interface (wait, done, cancel, status) for a FaultyReader batch."""

    def __init__(self, reader: FaultyReader, requests, faults, inner):
        self.reader, self.requests, self.faults, self.inner = reader, requests, faults, inner
        self.t0 = time.monotonic()
        self._outcome = None

    def done(self) -> bool:
        late = max((r.ms for r, _ in self.faults if r is not None and r.kind == "delay"), default=0)
        return self.inner.done() and time.monotonic() - self.t0 >= late / 1000

    def cancel(self) -> int:
        return self.inner.cancel()

    def _error(self, i: int, kind: str, **extra):
        fid, off, n = self.requests[i][:3]
        path = self.reader.inner.path(fid)
        common = dict(index=i, path=path, file_id=fid, offset=off, nbytes=n)
        if kind == "eio":
            return ReadError(f"{path}: reading {n} bytes at offset {off} failed (request {i}): "
                             f"{os.strerror(errno.EIO)} [injected]", kind="os", errno=errno.EIO, **common)
        if kind == "short":
            return ReadError(f"{path}: read past end of file: request {i} wants {n} bytes at offset {off} "
                             f"but the file ends at byte {off + n // 2} [injected]", kind="short",
                             file_end=off + n // 2, **common)
        return ChecksumError(f"{path}: checksum mismatch reading {n} bytes at offset {off} (request {i}): "
                             f"expected crc32c 0x{extra['expected']:08x}, got 0x{extra['actual']:08x} "
                             f"[injected bit flip]", kind="checksum", expected_crc=extra["expected"],
                             actual_crc=extra["actual"], **common)

    def _settle(self):
        if self._outcome is not None:
            return self._outcome
        try:
            self.inner.wait()
            failure = None
        except ReadError as e:
            failure = e
        late = max((r.ms for r, _ in self.faults if r is not None and r.kind == "delay"), default=0)
        if late:
            time.sleep(max(0.0, late / 1000 - (time.monotonic() - self.t0)))
        for i, ((fid, off, n, dest, crc), (rule, bits)) in enumerate(zip(self.requests, self.faults)):
            if rule is None or failure is not None:
                continue
            if rule.kind in ("eio", "short"):
                failure = self._error(i, rule.kind)
            elif rule.kind == "flip" and n:
                if isinstance(dest, int):
                    continue  # raw address: nothing safe to flip from here
                view = memoryview(dest.numpy() if hasattr(dest, "numpy") else dest).cast("B")
                view[bits % n] ^= 1 << (bits >> 24) % 8
                if crc is not None and crc32c(view[:n]) != crc:
                    failure = self._error(i, "flip", expected=crc, actual=crc32c(view[:n]))
        self._outcome = (failure,)
        return self._outcome

    def wait(self):
        failure, = self._settle()
        if failure is not None:
            raise failure

    def status(self):
        failure, = self._settle()
        out = ["ok"] * len(self.requests)
        if failure is not None:
            out[failure.index] = failure.kind
        return out


@hookimpl
def register_storage(register):
    register("native", Reader)
    register("faulty", FaultyReader)
