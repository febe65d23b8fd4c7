"""Routing traces and routing statistics.

A RoutingTrace records, while it is attached to an engine (`engine.record(trace)`; off by
default), two things:
- routes: per token position and MoE layer, the top-k expert ids the router chose;
- requests: every Pager.acquire call in order, (layer, step, expert ids), where step is the
  position of the first token of the forward chunk (decode: the token itself; prefill: the
  chunk, whose union of experts may come in several requests), and the chunk's token count
  (1 for decode: `decode_mask()` tells decode requests from prefill ones). This is what a replacement
  policy sees, so Belady and policy simulations (belady.py) replay it.

Saved as one .npz (TRACE_FILE beside the store's manifest by default). routing_stats.json holds
per-layer per-expert routing counts (how many token routings chose each expert):

    {"format": "flashmoe-routing-stats", "version": 1, "tokens": N, "top_k": k,
     "num_experts": E, "layers": {"0": [count per expert], ...},
     "frequencies": {"0": [count / tokens], ...}, "source": {...}}
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

TRACE_FILE = "routing_trace.npz"
STATS_FILE = "routing_stats.json"
STATS_FORMAT = "flashmoe-routing-stats"


def atomic_write(path: Path, data: bytes):
    """Write beside the target, fsync, rename over it: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RoutingTrace:
    def __init__(self):
        self.step, self.n_tokens = 0, 1
        self._req_tokens: list[int] = []
        self._route_layer, self._route_pos, self._route_ids = [], [], []
        self._req_layer, self._req_step, self._req_ids = [], [], []
        self.meta: dict = {}

    # -- recording (hooks called by Engine and ExpertPager)
    def begin(self, pos: int, n_tokens: int):
        self.step, self.n_tokens = pos, n_tokens

    def route(self, layer: int, ids):
        ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int32)
        n = ids.shape[0]
        self._route_layer.append(np.full(n, layer, np.int32))
        self._route_pos.append(np.arange(self.step, self.step + n, dtype=np.int32))
        self._route_ids.append(ids)

    def request(self, layer: int, experts):
        self._req_layer.append(layer)
        self._req_step.append(self.step)
        self._req_tokens.append(self.n_tokens)
        self._req_ids.append([int(e) for e in dict.fromkeys(experts)])

    def decode_step(self, step: int, routes, routed: bool = True):
        """Several layers' requests of the one-token step at position `step`, [(layer, ids), ...]
        (and with routed, the same ids as the token's routes), recorded after the fact: what
        begin(step, 1) then route() / request() per layer would have recorded."""
        now = self.step, self.n_tokens
        self.step, self.n_tokens = step, 1
        for layer, ids in routes:
            if routed:
                self.route(layer, [ids])
            self.request(layer, ids)
        self.step, self.n_tokens = now

    # -- reading
    def __len__(self) -> int:
        return len(self._req_ids)

    def requests(self, start: int = 0, stop: int | None = None) -> list[tuple[int, list[int]]]:
        return list(zip(self._req_layer[start:stop], self._req_ids[start:stop]))

    def request_keys(self, start: int = 0, stop: int | None = None) -> list[list[tuple[int, int]]]:
        """Requests as lists of (layer, expert) keys: the input of belady.py."""
        return [[(l, e) for e in ids] for l, ids in self.requests(start, stop)]

    def decode_mask(self) -> list[bool]:
        """Per request: True when it served a one-token forward (decode)."""
        return [n == 1 for n in self._req_tokens]

    def routes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layer [N], position [N], ids [N, k]) of every token routing recorded."""
        if not self._route_ids:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 0), np.int32)
        return (np.concatenate(self._route_layer), np.concatenate(self._route_pos),
                np.concatenate(self._route_ids))

    def counts(self, num_experts: int) -> dict[int, np.ndarray]:
        layer, _, ids = self.routes()
        out = {}
        for l in np.unique(layer):
            out[int(l)] = np.bincount(ids[layer == l].ravel(), minlength=num_experts)
        return out

    def tokens(self) -> int:
        layer, pos, _ = self.routes()
        return int(np.max(np.bincount(layer))) if len(layer) else 0

    # -- files
    def save(self, path):
        layer, pos, ids = self.routes()
        lens = np.array([len(r) for r in self._req_ids], np.int64)
        buf = io.BytesIO()
        np.savez(buf, route_layer=layer, route_pos=pos, route_ids=ids,
                 req_layer=np.array(self._req_layer, np.int32), req_step=np.array(self._req_step, np.int32),
                 req_tokens=np.array(self._req_tokens, np.int32),
                 req_ptr=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                 req_ids=np.array([e for r in self._req_ids for e in r], np.int32),
                 meta=np.array(json.dumps(self.meta)))
        atomic_write(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        t = cls()
        with np.load(path) as z:
            t._route_layer, t._route_pos, t._route_ids = [z["route_layer"]], [z["route_pos"]], [z["route_ids"]]
            ptr, ids = z["req_ptr"], z["req_ids"].tolist()
            t._req_layer = z["req_layer"].tolist()
            t._req_step = z["req_step"].tolist()
            # traces written before req_tokens existed: unknown, taken as prefill (n > 1)
            t._req_tokens = z["req_tokens"].tolist() if "req_tokens" in z else [0] * len(t._req_step)
            t._req_ids = [ids[ptr[i]:ptr[i + 1]] for i in range(len(ptr) - 1)]
            t.meta = json.loads(str(z["meta"]))
        return t


def write_routing_stats(folder, counts: dict[int, np.ndarray], tokens: int, top_k: int, num_experts: int,
                        source: dict | None = None) -> Path:
    layers = {str(l): [int(c) for c in v] for l, v in sorted(counts.items())}
    doc = {"format": STATS_FORMAT, "version": 1, "tokens": int(tokens), "top_k": int(top_k),
           "num_experts": int(num_experts), "layers": layers,
           "frequencies": {l: [round(c / max(tokens, 1), 6) for c in v] for l, v in layers.items()},
           "source": source or {}}
    path = Path(folder) / STATS_FILE
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def load_routing_stats(folder) -> dict | None:
    """{"tokens", "top_k", "num_experts", "counts": {layer: [count per expert]}} or None when the
    folder has no routing_stats.json. A malformed file is an error naming it."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != STATS_FORMAT:
            raise ValueError(f"field 'format' is {doc.get('format')!r}, expected {STATS_FORMAT!r}")
        counts = {int(l): [int(c) for c in v] for l, v in doc["layers"].items()}
        return {"tokens": int(doc["tokens"]), "top_k": int(doc["top_k"]),
                "num_experts": int(doc["num_experts"]), "counts": counts}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed routing stats ({e})") from None
