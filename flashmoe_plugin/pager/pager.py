"""The expert pager: tiers of record slots over the store, filled by the native reader threads.
It sees layers, expert ids and byte ranges; never architectures.

Tiers (each a SlotPool with a byte budget and a replacement policy):
- tier 0, "device": where the kernels read records: VRAM for CUDA runs, RAM for CPU runs;
- tier 1, "host" (optional): a victim cache in pinned RAM below the device tier. A record lives in
  one tier at a time: a device victim is copied down (device -> host), a host hit is copied up
  and leaves the host tier, and whatever the host tier evicts is dropped (the disk has it);
- the store on disk, read with pread (O_DIRECT or buffered) by C threads.

Data path of a tiered pager (CUDA, or its CPU twin): disk reads land in a small ring of pinned
staging buffers; each is copied to its device slot on the copy stream as soon as its read is
done, while the next reads continue; compute waits only on the events of the records it uses.
A CPU pager without a host tier reads straight into its slots.

    batch = pager.request(layer, experts)   # hits noted, demand reads submitted (high priority)
    pager.prefetch(layer2, guesses)          # optional: low-priority reads / copies for later layers
    for expert, record in batch: ...         # each record as soon as it is usable, in order

`acquire(layer, experts)` is the blocking form (a list of records). Records stay valid until
the next request.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from ..io import aligned_empty
from ..plugins import registry
from ..sizes import available_ram, format_size
from ..store.format import StoreError
from .policies import LRU
from .stats import PagerStats
from .tiers import CudaCopies, HostCopies, SlotPool

DEMAND, PREFETCH = 1, 0  # reader priorities
TRANSIENT = ("os", "short", "checksum")  # read failures worth another attempt (a flaky disk or cable)


class BudgetError(ValueError):
    pass


def default_direct_io(need: int | None = None, free: int | None = None) -> bool:
    """O_DIRECT when what the model needs in RAM (`need`: its experts and dense part) exceeds the
    free RAM (`free` bytes): the page cache cannot keep the experts anyway, and its copies and
    reclaim take the cores the kernels need (Mixtral on the 2-core box: 1.15 tok/s with O_DIRECT,
    0.77 buffered; benchmarks/README.md, issue 10). Buffered otherwise: records evicted from the
    tiers may come back from the page cache."""
    return need is not None and free is not None and need > free


class _Read:
    __slots__ = ("key", "ticket", "dest", "staging", "slot", "prefetch", "demand", "t0")

    def __init__(self, key, ticket, dest, staging, slot, prefetch):
        self.key, self.ticket, self.dest, self.staging, self.slot, self.prefetch = key, ticket, dest, staging, slot, prefetch
        self.demand = not prefetch  # submitted as a demand read (a prefetch claimed later waited in line longer)
        self.t0 = time.perf_counter()


class ExpertPager:
    def __init__(self, store, budget: int | None = None, policy: str = "auto", io_threads: int = 4,
                 direct_io: bool = False, verify: bool = True, device="cpu", host_budget: int | None = 0,
                 prefetch_slots: int | None = None, storage: str = "native", storage_options: dict | None = None,
                 retries: int = 2, huge_pages: bool = False):
        self.store, self.verify, self.retries = store, verify, int(retries)
        reader_name = storage
        self.device = torch.device(device)
        size = self.record_size = store.layout.size
        total = self.total_records = sum(l.experts for l in store.layers.values())
        need = self.need = store.config.top_k
        if budget is None:  # default: everything, or half the free RAM if that is less
            budget = min(total * size, max(available_ram() // 2, need * size))
        n0 = min(total, budget // size)
        tier = "VRAM" if self.device.type == "cuda" else "expert"
        if n0 < need:
            raise BudgetError(
                f"{tier} budget {format_size(budget)} holds {n0} expert records of {format_size(size)}; one token "
                f"needs {need} per layer: the minimum is {format_size(need * size)} ({need * size} bytes)")
        policies = registry().policies
        if policy not in policies:
            raise ValueError(f"unknown cache policy {policy!r}; registered: {', '.join(sorted(policies))}")
        self.tiered = self.device.type != "cpu" or bool(host_budget)
        self.copies = CudaCopies(self.device) if self.device.type == "cuda" else HostCopies()
        n1 = min(total - n0, (host_budget or 0) // size) if self.tiered else 0
        self.capacity, self.host_capacity = n0, n1
        # huge_pages: a CPU tier in transparent huge pages (io.advise_huge_pages), opt-in. The kernels
        # stream a token's two experts in 6.35 ms against 6.65 in 4 KiB pages (2-core box), but when
        # the RAM is nearly all page cache (after another process read a big file) each huge fault
        # compacts and reclaims in the faulting thread: prefill and the first decode tokens lost more
        # than the kernels gain (benchmarks/README.md, session 10)
        storage = aligned_empty(n0 * size, huge=huge_pages) if self.device.type == "cpu" else \
            torch.empty(n0 * size, dtype=torch.uint8, device=self.device)
        self.t0 = SlotPool("device", n0, size, policies[policy](n0), storage)
        self.policy = self.t0.policy
        # The host tier is a victim cache: its order is the order records fell out of tier 0 (LRU).
        # One spare row: a host hit leaves while the device victim it swaps with comes down.
        self.t1 = SlotPool("host", n1, size, LRU(n1), self.copies.host_memory((n1 + 1) * size), spare=1) if n1 else None
        # Prefetch reads in flight at most; demand keeps 2 x top_k staging buffers of its own.
        self.prefetch_slots = need * 2 if prefetch_slots is None else int(prefetch_slots)
        if self.tiered:
            n = 2 * need + self.prefetch_slots
            self.staging = self.copies.host_memory(n * size).view(n, size)
            self.staging_free = deque(range(n))
            self.staging_fence: list = [None] * n
        self.reads: dict = {}          # key -> _Read in flight (demand or prefetch)
        self.cancelling: list = []     # cancelled prefetch reads whose started chunks still run
        self.prefetched: set = set()   # keys a prefetch brought to tier 0, not used yet
        self.protected: set = set()    # keys of the current request: never evicted
        self._fence = None             # compute-stream event of the current request
        self._noted: list = []         # device hits counted but not touched yet (note_hits(later=True))
        readers = registry().storage
        if reader_name not in readers:
            raise ValueError(f"unknown storage reader {reader_name!r}; registered: {', '.join(sorted(readers))}")
        self.reader = readers[reader_name](nthreads=io_threads, direct=direct_io, **(storage_options or {}))
        self.fids = {}  # file path -> reader file id (a GGUF store's extents need buffered reads)
        self._direct = getattr(store, "direct_io", None)
        self.stats = PagerStats(verify=verify)
        self.trace = None      # a pager.trace.RoutingTrace while recording (Engine.record)
        self.predictor = None  # a pager.predictor.Predictor when prefetching (Engine sets it)
        self.preload(self.policy.warm(store) if hasattr(self.policy, "warm") else [])

    # ------------------------------------------------------------------ facts
    @property
    def budget(self) -> int:
        return self.capacity * self.record_size

    @property
    def total_capacity(self) -> int:
        """Distinct records the tiers hold together (they are exclusive)."""
        return self.capacity + self.host_capacity

    def resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.t0

    def cold(self, layer: int, experts) -> list[int]:
        """The experts no tier holds and no read is bringing: a prefetch of them costs a disk read."""
        t1 = self.t1
        return [e for e in experts if (layer, e) not in self.t0 and (layer, e) not in self.reads
                and (t1 is None or (layer, e) not in t1)]

    def ready_first(self, layer: int, experts) -> list[int]:
        """experts reordered for a request whose records are used as they land: resident ones
        first, then those a read is already bringing, then the rest (stable)."""
        def rank(e):
            key = (layer, int(e))
            return 0 if key in self.t0 or (self.t1 is not None and key in self.t1) else 1 if key in self.reads else 2
        return sorted(experts, key=rank)

    def note_hits(self, layer: int, experts, later: bool = False):
        """Records a graph-captured decode step read straight from tier 0 (through the slot
        table, no request): counted and touched as a request's device hits would be. later:
        counted now, recorded in the trace and touched (policy, prefetch marks) at the pager's
        next request or prefetch, in order, so a decode step can leave that bookkeeping to the
        time the GPU runs the next token (the policy's state is then what it would have been at
        any decision it takes)."""
        self.note_step([(layer, experts)], later)

    def note_step(self, routes, later: bool = False, routed: bool = False):
        """note_hits for several layers, [(layer, experts), ...] in layer order (a decode step's
        layers that hit: one call, counted at once). routed: these are also the token's routing
        (a one-token step's ids per layer), recorded in the trace as its routes too."""
        n = sum(len(set(experts)) for _, experts in routes)
        self.stats.hits += n
        self.stats.device_hits += n
        noted = (routes, routed, self.trace.step if self.trace is not None else 0)
        if later:
            self._noted.append(noted)
        else:
            self.touch_noted()
            self._settle_noted(*noted)

    def touch_noted(self):
        """The trace records and touches note_step(later=True) left for later, now (also done
        by the pager itself before any request, prefetch or eviction decision, and by the engine
        before its trace is detached)."""
        noted, self._noted = self._noted, []
        for item in noted:
            self._settle_noted(*item)

    def _settle_noted(self, routes, routed: bool, step: int):
        if self.trace is not None:
            self.trace.decode_step(step, routes, routed)
        self._touch(routes)

    def _touch(self, routes):
        for layer, experts in routes:
            for e in dict.fromkeys(int(e) for e in experts):
                self.policy.touch((layer, e))
                self.prefetched.discard((layer, e))

    # ------------------------------------------------------------------ demand
    def request(self, layer: int, experts: list[int], host_ok=False) -> "_Batch":
        """host_ok: records found in the host tier stay there and are yielded from host memory
        (the caller computes them on the CPU, Fiddler-style); `batch.on_host` names them. True:
        all of them; a callable: host_ok(m) says how many of the m host-tier records stay (the
        others are copied up)."""
        keys = [(layer, e) for e in dict.fromkeys(int(e) for e in experts)]
        if len(keys) > self.capacity:
            raise BudgetError(f"{len(keys)} experts requested at once; the device tier holds {self.capacity}")
        self.touch_noted()  # the deferred trace records come first
        if self.trace is not None:
            self.trace.request(layer, [k[1] for k in keys])
        return self._batch(keys, layer=layer, host_ok=host_ok)

    def acquire(self, layer: int, experts: list[int]) -> list[torch.Tensor]:
        """Blocking form of request(): the records of `experts` (in that order, repeats allowed)."""
        got = dict(self.request(layer, experts))
        return [got[int(e)] for e in experts]

    def _batch(self, keys, layer=None, count=True, host_ok=False) -> "_Batch":
        self.touch_noted()
        self.protected = set(keys)
        self._fence = self.copies.fence()
        self._progress()
        if layer is not None:
            self._settle_prefetches(layer)
        st, plan = self.stats, []
        if callable(host_ok):
            host_ok = host_ok(sum(1 for k in keys if self.t1 is not None and k in self.t1 and k not in self.t0))
        in_place = len(keys) if host_ok is True else int(host_ok or 0)
        for key in keys:
            if key in self.t0:
                self.policy.touch(key)
                state = "device"
            elif self.t1 is not None and key in self.t1:
                state = "host"
                if in_place > 0:  # served where it is
                    in_place -= 1
                    self.t1.policy.touch(key)
                    if count:
                        self.stats.host_computed += 1
                else:  # copied up now: a hit, placed before this request's misses (as LRU does)
                    self._up(key, self.t1.slots[self.t1.slot_of[key]])
            else:
                state = self.reads.get(key, "disk")
            if count:
                if state == "device":
                    st.hits, st.device_hits = st.hits + 1, st.device_hits + 1
                elif state == "host":
                    st.hits, st.host_hits = st.hits + 1, st.host_hits + 1
                else:
                    st.misses += 1
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    st.prefetch_used += 1
                elif isinstance(state, _Read):
                    st.prefetch_used += 1
            if isinstance(state, _Read):
                state.prefetch = False  # claimed by demand
            plan.append((key, state))
        return _Batch(self, plan, count)

    def preload(self, keys):
        """Load these keys into the device tier now (a policy's pinned experts at start, an
        n_cpu_moe engine's other layers); not counted as hits or misses."""
        keys = [k for k in dict.fromkeys(keys) if k[0] in self.store.layers][:self.capacity]
        for _ in self._batch(keys, count=False):
            pass
        self.protected = set()
        self.stats.preloaded += len(keys)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, layer: int, experts, from_disk=True, from_host: bool | int = True,
                 priority: int = PREFETCH, replace: bool = False) -> int:
        """Start bringing `experts` of a later layer to the device tier at low priority: host-tier
        records are copied up, others read from disk (at most `prefetch_slots` reads in flight).
        from_disk: True, False, or the set of `experts` worth a disk read (the others are only
        copied up from the host tier, and a replace keeps their reads). from_host: True, False, or
        how many host-tier records may be copied up (a copy budget: the first guesses first).
        Never evicts the current request's records. Returns how many were started.
        priority (<= PREFETCH): the reader serves higher first, so a caller can have the layer
        needed soonest read first. replace: this is a newer guess for `layer`: its unfinished
        prefetch reads of other experts are cancelled (a closer guess is the better one)."""
        if priority >= DEMAND:
            raise ValueError(f"prefetch priority {priority} must be below demand's {DEMAND}")
        self.touch_noted()
        self._progress()
        if replace:
            self._settle_prefetches(layer, keep={(layer, int(e)) for e in experts}, wait=False)
        started, reading = 0, sum(r.prefetch for r in self.reads.values())
        disk = (lambda e: from_disk) if isinstance(from_disk, bool) else from_disk.__contains__
        ups = (1 << 30) if from_host is True else int(from_host)
        for e in dict.fromkeys(int(e) for e in experts):
            key = (layer, e)
            if key in self.t0 or key in self.reads:
                continue
            if self.t1 is not None and key in self.t1:
                if ups > 0 and self._has_victim():
                    ups -= 1
                    self._up(key, self.t1.slots[self.t1.slot_of[key]])
                    self.prefetched.add(key)
                    self.stats.prefetch_copies += 1
                    started += 1
            elif disk(e) and reading < self.prefetch_slots:
                if self._submit(key, priority) is None:
                    break
                self.stats.prefetch_reads += 1
                started += 1
                reading += 1
        return started

    def _has_victim(self) -> bool:
        return bool(self.t0.free) or len(self.t0) > len(self.protected & self.t0.slot_of.keys())

    def _settle_prefetches(self, layer: int, keep=(), wait=True):
        """The real routing of `layer` is known (or a newer guess, `keep`): cancel its prefetch
        reads it does not want."""
        for key in [k for k, r in self.reads.items()
                    if k[0] == layer and r.prefetch and k not in self.protected and k not in keep]:
            self._cancel(self.reads.pop(key), wait)

    def _cancel(self, r: _Read, wait=True):
        """Drop a prefetch read (whatever part of it has not started) and free its buffer; without
        `wait` the buffer is freed later, once the chunks already started are done (_reap)."""
        r.ticket.cancel()
        self.stats.prefetch_cancelled += 1
        self.stats.prefetch_wasted += 1
        if not wait:
            self.cancelling.append(r)
            return
        self._settle(r)

    def _settle(self, r: _Read):
        try:
            r.ticket.wait()
        except OSError:
            pass
        finally:  # also on Ctrl-C (the ticket settles its reads before raising)
            self._free_dest(r)

    def _reap(self, block=False):
        """Free the buffers of cancelled reads that are done (all of them when `block`)."""
        left = []
        for r in self.cancelling:
            if block or r.ticket.done():
                self._settle(r)
            else:
                left.append(r)
        self.cancelling = left

    def _progress(self):
        """Finish prefetch reads that are done (tiered: queue their copies to the device)."""
        if self.cancelling:
            self._reap()
        for key in [k for k, r in self.reads.items() if r.prefetch and r.ticket.done()]:
            if self.tiered and not self._has_victim():
                return  # the device tier holds only this request's records: later
            if self._finish(self.reads.pop(key)):
                self.prefetched.add(key)

    # ------------------------------------------------------------------ moving records
    def _submit(self, key, priority):
        """Queue the disk read of one record (its extents: one for a store, three for a GGUF);
        None when no buffer is free (prefetch only)."""
        layer, e = key
        if self.tiered:
            if priority < DEMAND and len(self.staging_free) <= 2 * self.need:
                return None
            if not self.staging_free:
                self._reclaim_staging()
            s = self.staging_free.popleft()
            self.copies.wait(self.staging_fence[s])  # its last copy to the device must be done
            dest, slot = self.staging[s], None
        else:
            try:
                slot = self._take0()
            except RuntimeError:  # every slot is protected or reserved by prefetch reads
                if priority < DEMAND:
                    return None
                self._drop_prefetch_reads()
                slot = self._take0()
            s, dest = None, self.t0.slots[slot]
        r = self.reads[key] = _Read(key, self._read(key, dest, priority), dest, s, slot, priority < DEMAND)
        return r

    def _read(self, key, dest, priority):
        """Submit the reads of one record (one extent for a store, three for a GGUF file)."""
        reads = self.store.record_reads(*key, self.verify)
        self.stats.bytes_read += sum(n for _, _, n, _, _ in reads)
        return self.reader.submit([(self._fid(f), off, n, dest[at:at + n], crc) for f, off, n, at, crc in reads],
                                  priority)

    def _fid(self, path) -> int:
        fid = self.fids.get(path)
        if fid is None:
            fid = self.fids[path] = self.reader.open(str(path), direct=self._direct)
        return fid

    def _reclaim_staging(self):
        """Every staging buffer is held by a read: finish the oldest prefetch read."""
        if self.cancelling:
            self._reap(block=True)
            return
        for key, r in self.reads.items():
            if r.prefetch:
                del self.reads[key]
                if self._has_victim():
                    if self._finish(r):
                        self.prefetched.add(key)
                else:
                    self._cancel(r)
                return
        raise RuntimeError("pager: no staging buffer free and no prefetch to reclaim")

    def _drop_prefetch_reads(self):
        for key in [k for k, r in list(self.reads.items()) if r.prefetch]:
            r = self.reads.pop(key, None)  # close() from another thread: a step may have taken it
            if r is not None:
                self._cancel(r)
        self._reap(block=True)

    def _free_dest(self, r: _Read):
        if r.staging is not None:
            self.staging_free.append(r.staging)
        else:
            self.t0.release(r.slot)

    def _finish(self, r: _Read) -> bool:
        """Wait for a read (checking it: a cancelled read fails too) and make the record resident
        in tier 0. A failed demand read is tried again (`retries` times) when the failure may be
        transient, then raises StoreError naming file, layer and expert; a failed prefetch is
        dropped (False): the demand read, if any, tries again. Bytes that failed their checksum
        are never installed."""
        attempt = 0
        while True:
            try:
                r.ticket.wait()
                break
            except BaseException as err:  # a failed read, or Ctrl-C: the buffer goes back either way
                kind = getattr(err, "kind", "")
                if isinstance(err, OSError) and kind in TRANSIENT and attempt < self.retries and not r.prefetch:
                    attempt += 1
                    self.stats.read_retries += 1
                    r.ticket = self._read(r.key, r.dest, DEMAND)
                    continue
                self._free_dest(r)
                if not isinstance(err, OSError):
                    raise
                self.stats.read_failures += 1
                if r.prefetch:
                    self.stats.prefetch_wasted += 1
                    return False
                layer, e = r.key
                cause = "checksum mismatch: the store is damaged (run `flashmoe inspect --verify`)" \
                    if kind == "checksum" else str(err).removeprefix(f"{getattr(err, 'path', '')}: ")
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise StoreError(f"{self.store.layer_path(layer)}: layer {layer} expert {e}: {cause}{tries}") from err
        if self.predictor is not None and r.demand:
            self.predictor.note_read(time.perf_counter() - r.t0)
        if r.staging is None:
            self.t0.put(r.key, r.slot)
        else:
            self.staging_fence[r.staging] = self._up(r.key, r.dest)
            self.staging_free.append(r.staging)
        return True

    def _take0(self) -> int:
        """A tier-0 slot; its victim (never a key of the current request) goes down to the host tier."""
        slot, victim = self.t0.take(self.protected)
        if victim is not None:
            self.stats.evictions += 1
            if victim in self.prefetched:
                self.prefetched.discard(victim)
                self.stats.prefetch_wasted += 1
            if self.t1 is not None:
                try:
                    hslot, _ = self.t1.take(self.protected)
                except RuntimeError:  # the host tier holds only records this request needs
                    return slot
                ev = self.copies.copy(self.t1.slots[hslot], self.t0.slots[slot],
                                      after=(self._fence, self.t0.fence[slot], self.t1.fence[hslot]))
                self.t0.fence[slot] = self.t1.fence[hslot] = ev
                self.t1.put(victim, hslot)
                self.stats.demoted += 1
        return slot

    def _up(self, key, src: torch.Tensor):
        """Copy a record from host memory (staging or host tier) into a tier-0 slot, after the
        compute that may still read the slot and the copies that touch either end."""
        # leave the host tier first, so that the device victim going down cannot take this slot
        hslot = self.t1.pop(key) if self.t1 is not None and key in self.t1 else None
        slot = self._take0()
        ev = self.copies.copy(self.t0.slots[slot], src, after=(
            self._fence, self.t0.fence[slot], None if hslot is None else self.t1.fence[hslot]))
        if hslot is not None:
            self.t1.fence[hslot] = ev
            self.t1.release(hslot)
        self.t0.put(key, slot)
        self.t0.fence[slot] = ev
        self.stats.bytes_copied += self.record_size
        return ev

    def close(self):
        self._drop_prefetch_reads()
        for r in self.reads.values():
            r.ticket.cancel()
        self.reader.close()
        self.reads.clear()
        self.copies.close()


class _Batch:
    """One request's records, yielded in order as each becomes usable. Disk reads are submitted
    ahead as far as buffers allow, so reading, copying and compute overlap."""

    def __init__(self, pager: ExpertPager, plan, count: bool):
        self.p, self.plan, self.count = pager, plan, count
        self.todo = deque(key for key, state in plan if state == "disk")
        self.on_host = {key[1] for key, state in plan if state == "host" and key not in pager.t0}
        self.waits = bool(self.todo) or any(isinstance(state, _Read) for _, state in plan)  # a read to wait for
        self._submit_ahead()

    def _submit_ahead(self, need=None):
        """Submit demand reads in request order while buffers are free, and at least up to `need`."""
        p = self.p
        while self.todo and (not p.tiered or p.staging_free or (need is not None and need not in p.reads)):
            key = self.todo.popleft()
            if key not in p.reads:
                p._submit(key, DEMAND)

    def __iter__(self):
        try:
            yield from self._records()
        except BaseException:
            # this request failed: the reads it submitted ahead are settled like prefetches
            for key, _ in self.plan:
                if key in self.p.reads:
                    self.p.reads[key].prefetch = True
            self.todo.clear()
            raise

    def _records(self):
        p = self.p
        for key, state in self.plan:
            if state not in ("device", "host"):
                if key not in p.reads:  # not submitted yet (buffers were short)
                    self._submit_ahead(need=key)
                r = p.reads.pop(key)
                t0 = time.perf_counter()
                p._finish(r)
                if self.count:
                    p.stats.read_seconds += time.perf_counter() - t0
                self._submit_ahead()
            if key[1] in self.on_host:
                slot = p.t1.slot_of[key]
                p.copies.wait(p.t1.fence[slot])  # its trip down from the device must be complete
                yield key[1], p.t1.slots[slot]
                continue
            slot = p.t0.slot_of[key]
            p.copies.use(p.t0.fence[slot])
            yield key[1], p.t0.slots[slot]
