"""The prefetch predictor's bookkeeping: it grades look-ahead routing guesses against the real
routing and decides, from its own measurements, whether prefetching pays.

The engine makes the guesses (after layer L routes, it applies the routers of layers L+1..L+d to
the current hidden state: the model knows routers, the pager does not) and reports them here
with `guessed(layer, ids, distance)`; `observe(layer, ids)` grades them when that layer really
routes. `allow(distance, from_disk)` is the cost model:

- a guess whose record sits in the host tier costs one host->device copy when wrong (PCIe time,
  mostly idle during decode): prefetch when precision >= 0.25;
- a guess that must come from disk (a "cold" guess: its record is in no tier and not being read)
  costs a whole record read when wrong, which delays the reads
  the token needs, and when right saves at most the disk time that would otherwise go idle:
  min(read time, lead time), where the lead time is `distance` x the measured busy time per
  layer (wall time between two layers less the time spent waiting for reads). Prefetch when
  precision x min(read, lead) > (1 - precision) x read, with the precision of the cold guesses
  at that distance once there are `min_observations` of them (they are the ones that cost reads,
  and they are worse than the average guess: records the cache lacks are the rarely used ones,
  and the right guesses were mostly read at a farther distance already), and no disk read before
  that. Each guessed expert also carries its router margin (its logit less the best logit left
  out: Model.guess_scored), and cold guesses are graded per distance and margin class: a read is
  judged by its own class's precision (on the synth Mixtral store: under 0.5 right 29% of the
  time, 0.5-1 37%, 1-2 ~60%, over 2 83%), so the confident guesses are read and the unsure ones
  left to demand, at any disk speed. A disk-bound run (busy time ~0.1 ms,
  reads ~100 ms) needs a precision above 0.999; a compute-bound one about 0.5. A distance whose
  nearer neighbour already leads by a whole read ((distance - 1) x busy >= read) adds nothing but
  wrong guesses, so it is not used: `depth` is a cap, the lead time picks how far to look.

`depth` None (the default) looks up to `auto_depth` layers ahead for disk reads (the lead rule
above picks how far: on the 2-core box a record read takes ~70 ms and a layer ~11 ms of compute,
so 7 layers) and one layer ahead for host-tier copies (a copy takes ~2 ms: one layer hides it, and
a farther copy would only take device slots earlier); `reach()` says how many distances are worth
guessing now. Far distances fail first, so the depth shrinks on its own, and prefetching stops
when it costs more than it saves (on a disk-bound run with near-random routing, it stops). Mode
"on" skips the cost model; "auto" waits for `min_observations` graded guesses at a distance
before trusting it.
"""
from __future__ import annotations

import time
from bisect import bisect_right


class Predictor:
    min_observations = 8
    host_threshold = 0.25
    auto_depth = 8
    # a cold guess's confidence class: its router margin (logit less the best logit left out)
    # below 0.5, 0.5-1, 1-2, above 2; each class is graded apart at each distance
    margin_bounds = (0.5, 1.0, 2.0)

    def __init__(self, mode: str = "auto", depth: int | None = None):
        if mode not in ("auto", "on"):
            raise ValueError(f"prefetch must be on, off or auto, not {mode!r}")
        self.mode = mode
        self.depth = self.auto_depth if depth is None else max(1, int(depth))
        self.host_depth = 1 if depth is None else self.depth
        self.pending: dict[int, list[tuple[int, set]]] = {}
        self.by_distance = {d: [0, 0, 0, 0] for d in range(1, self.depth + 1)}  # hits, guessed, actual, graded
        self.cold = {d: [0, 0] for d in range(1, self.depth + 1)}                # cold guesses: hits, guessed
        self.cold_by_margin = {d: [[0, 0] for _ in range(len(self.margin_bounds) + 1)]  # the same per margin class
                               for d in range(1, self.depth + 1)}
        self.by_layer: dict[int, list[int]] = {}                                 # hits, guessed, actual
        self.busy_s: float | None = None   # EMA of the time between two layers' routing, less read stalls
        self.read_s: float | None = None   # EMA of one record's read time (set by the pager's measurements)
        self._last = None                  # (time, cumulative stall) at the last observe

    # ---------------------------------------------------------------- measurements
    def guessed(self, layer: int, ids, distance: int, cold=(), margins=None):
        """A guess of `layer`'s experts made `distance` layers ahead; `cold`: those of them no
        tier holds and no read is bringing (a prefetch of them costs a disk read); `margins`: the
        router margin of each of `ids` (Model.guess_scored), or None."""
        m = dict(zip(ids, margins)) if margins is not None else {}
        cold = {e: self.margin_class(m.get(e)) for e in cold}
        self.pending.setdefault(layer, []).append((distance, set(ids), cold))

    def margin_class(self, margin: float | None) -> int | None:
        return None if margin is None else bisect_right(self.margin_bounds, margin)

    def observe(self, layer: int, ids, stalled: float = 0.0):
        """Layer `layer` routed to `ids` (one token): grade the guesses made for it. `stalled`:
        the pager's cumulative time spent waiting for reads."""
        now = time.perf_counter()
        if self._last is not None:
            busy = max(0.0, now - self._last[0] - (stalled - self._last[1]))
            self.busy_s = busy if self.busy_s is None else 0.9 * self.busy_s + 0.1 * busy
        self._last = (now, stalled)
        actual = set(ids)
        for distance, guess, cold in self.pending.pop(layer, ()):
            c = self.cold[distance]
            c[0] += len(cold.keys() & actual); c[1] += len(cold)
            for e, cls in cold.items():
                if cls is not None:
                    cell = self.cold_by_margin[distance][cls]
                    cell[0] += e in actual; cell[1] += 1
            hit = len(guess & actual)
            d = self.by_distance[distance]
            d[0] += hit; d[1] += len(guess); d[2] += len(actual); d[3] += 1
            per = self.by_layer.setdefault(layer, [0, 0, 0])
            per[0] += hit; per[1] += len(guess); per[2] += len(actual)

    def end_sequence(self):
        """Guesses for layers a forward pass never reached are dropped, ungraded."""
        self.pending.clear()
        self._last = None

    def note_read(self, seconds_per_record: float):
        self.read_s = seconds_per_record if self.read_s is None else 0.9 * self.read_s + 0.1 * seconds_per_record

    # ---------------------------------------------------------------- decisions
    def precision(self, distance: int | None = None) -> float | None:
        hits, guessed = self._sum(distance, 0), self._sum(distance, 1)
        return hits / guessed if guessed else None

    def recall(self, distance: int | None = None) -> float | None:
        hits, actual = self._sum(distance, 0), self._sum(distance, 2)
        return hits / actual if actual else None

    def _sum(self, distance, i):
        rows = self.by_distance.values() if distance is None else [self.by_distance[distance]]
        return sum(r[i] for r in rows)

    def reach(self) -> int:
        """The farthest distance worth guessing now: `depth`, less the distances the lead rule
        rules out for disk reads (and beyond `host_depth` for copies)."""
        if self.mode == "on":
            return self.depth
        disk = 1
        if self.busy_s is not None and self.read_s is not None:
            while disk < self.depth and disk * self.busy_s < self.read_s:
                disk += 1
        return max(disk, min(self.host_depth, self.depth))

    def allow(self, distance: int, from_disk: bool, margin: float | None = None) -> bool:
        """Whether a guess `distance` layers ahead pays for its prefetch: a copy up from the host
        tier, or a disk read (judged by the precision of the cold guesses at that distance, and of
        those in the guess's margin class once that class has been graded enough)."""
        if not from_disk and distance > self.host_depth:
            return False
        if self.mode == "on":
            return True
        if self.by_distance[distance][3] < self.min_observations:
            return False
        p = self.precision(distance)
        if not from_disk:
            return p >= self.host_threshold
        p = self.cold_precision(distance, margin)
        if p is None:  # no disk read on faith: cold guesses are right far less often than guesses overall
            return False
        if self.read_s is None or self.busy_s is None:
            return False
        if distance > 1 and (distance - 1) * self.busy_s >= self.read_s:
            return False
        lead = distance * self.busy_s
        return p * min(self.read_s, lead) > (1 - p) * self.read_s

    def cold_precision(self, distance: int, margin: float | None = None) -> float | None:
        """The measured precision of cold guesses at `distance`: of those in the margin class of
        `margin` (pooled with the farther distances while the class is sparse at this one: less
        precise, a cautious figure), else of all cold guesses at that distance; None before
        `min_observations` of them were graded."""
        cls = self.margin_class(margin)
        if cls is not None:
            hits, cold = self.cold_by_margin[distance][cls]
            if cold < self.min_observations:
                cells = [self.cold_by_margin[d][cls] for d in range(distance, self.depth + 1)]
                hits, cold = sum(c[0] for c in cells), sum(c[1] for c in cells)
            if cold >= self.min_observations:
                return hits / cold
        hits, cold = self.cold[distance]
        return hits / cold if cold >= self.min_observations else None

    def _margin_label(self, i: int) -> str:
        b = self.margin_bounds
        return f"<{b[0]}" if i == 0 else f">={b[-1]}" if i == len(b) else f"{b[i - 1]}-{b[i]}"

    def snapshot(self) -> dict:
        def pr(h, g, a):
            return {"precision": h / g if g else None, "recall": h / a if a else None}
        return {"mode": self.mode, "depth": self.depth, "host_depth": self.host_depth,
                "precision": self.precision(), "recall": self.recall(),
                "by_distance": {d: {**pr(*r[:3]), "guesses": r[3], "cold_guesses": self.cold[d][1],
                                    "cold_precision": self.cold[d][0] / self.cold[d][1] if self.cold[d][1] else None,
                                    "cold_by_margin": {self._margin_label(i): [h, n] for i, (h, n)
                                                       in enumerate(self.cold_by_margin[d]) if n}}
                                for d, r in self.by_distance.items()},
                "by_layer": {l: pr(*r) for l, r in sorted(self.by_layer.items())},
                "busy_ms_per_layer": None if self.busy_s is None else self.busy_s * 1e3,
                "read_ms_per_record": None if self.read_s is None else self.read_s * 1e3}
