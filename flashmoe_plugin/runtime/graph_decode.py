"""Decode without the host in the loop: one token's whole forward pass with the routing, the
expert lookup and the KV position on the device, replayed as one captured CUDA graph.

A step, when every expert it needs is resident (the fast path):
- the token id and the position live in static device buffers (the position advances inside
  the graph); RoPE and the attention mask come from the position tensor, attention reads the
  whole preallocated KV cache under that mask (static shapes);
- each MoE layer routes on the device (softmax, top-k, weights), looks its experts' slots up in
  the device-side slot table (pager/slot_table.py) and runs the fused kernel on those records'
  addresses;
- the graph also keeps, per layer, the routed ids and the residual state entering the layer.
The host replays the graph and reads the logits and, per MoE layer, the routed ids and how many
of them the slot table lacked (counted on the device), into pinned memory: one synchronisation per
token, which sampling needs anyway. A layer whose experts were not all resident read a
placeholder (slot 0) and everything after it is void, so the step is recomputed from that layer's
saved input through the engine's per-layer pager path (demand reads, copies, host compute,
prefetch), layer by layer, with the same kernels. Layers before the first miss keep the graph's
results; the host never stalls them. When nothing missed, the hits are counted at once but the
policy's touches and an attached trace's records wait until the next token's replay is queued
(pager.note_step(later=True)): the GPU never waits for that bookkeeping (~8 us per layer, ~0.2 ms
a token with a trace on the 2-core box).

The step's pieces are runtime/decode_ops.py's functions, compiled with torch.compile on CUDA
(~16 kernels per MoE layer instead of ~60; inductor rounds intermediates as eager code does, so a
step resumed from a saved bf16 residual sees what the fused kernel saw), and everything runs on a
decode stream of its own, the one the graph was captured on (eager steps then make the same cuBLAS
choices as the captured ones).

Modes (Engine(decode_graph=...)): "auto" = the graph on CUDA with a native q8/q4/q2 store, else
off; "on" = the fast path (captured on CUDA; on CPU the same device-side logic without capture:
the CPU twin CI runs); "eager" = the same step with every layer through the pager path (the
reference the graph must equal bit for bit); "off" = the decoder's ordinary path.
The predictor is not consulted on the fast path (its prefetches would be the host in the
loop); layers that fall back use it as usual.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..kernels import decode_fuse
from ..kernels.packed import concat_rows
from ..models.layers import embed
from ..pager.slot_table import SlotTable
from .decode_ops import Ops

MODES = ("auto", "on", "eager", "off")


def graph_mode(mode, engine) -> tuple[str, str]:
    """(mode actually used, why) for an engine."""
    if mode not in MODES:
        raise ValueError(f"decode_graph must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return mode, "asked"
    why = unsupported(engine)
    if why and mode != "auto":
        raise ValueError(f"decode_graph={mode!r}: the device step does not implement this model's {why}")
    if why:
        return "off", f"the device step does not implement this model's {why}"
    if mode != "auto":
        return mode, "asked"
    if engine.device.type != "cuda":
        return "off", "not a CUDA run"
    native = getattr(engine.backend, "_native", None)
    if native is None or not native(engine.store.layout):
        return "off", "the store's expert format has no native CUDA kernel (q8/q4/q2 only)"
    return "on", "CUDA run with a native expert format"


def unsupported(engine) -> str:
    """What of this model the device step (GQA attention under a causal mask, softmax routing,
    plain SwiGLU experts: decode_ops.py) does not compute; empty when it computes all of it."""
    c, m = engine.config, engine.model
    parts = (("hybrid DeltaNet layers", bool(c.layer_types)), ("latent attention (MLA)", c.attention != "gqa"),
             ("attention sinks", c.attn_sinks), ("soft-capped attention", bool(c.attn_softcap)),
             ("sliding window", bool(c.sliding_window)), ("YaRN scaling", getattr(m, "rope_factor", 1.0) != 1.0),
             ("post-norms", c.sandwich_norms), (f"{c.router} routing", c.router != "softmax"),
             ("router bias", c.router_bias), (f"{c.expert_act} experts", c.expert_act != "swiglu"),
             ("expert biases", c.expert_bias), ("output bias", c.o_bias),
             ("scaled embeddings or logits", c.embed_scale != 1.0 or c.logit_scale != 1.0),
             ("attention scale", c.attn_scale is not None), ("partial RoPE", c.partial_rotary_factor != 1.0),
             ("gated attention output", c.attn_output_gate))
    return ", ".join(name for name, present in parts if present)


class DeviceDecode:
    def __init__(self, engine, mode: str = "on"):
        self.e, self.mode = engine, mode
        cfg, dev = engine.config, engine.device
        self.cfg, self.model, self.kv = cfg, engine.model, engine.kv
        self.order = engine._moe_order
        self.table = SlotTable(engine.pager, self.order, cfg.num_experts)
        self.cuda = dev.type == "cuda"
        self.native = self.cuda and engine.backend.name == "cuda" and engine.backend._native(engine.store.layout)
        n_ctx, dt = engine.n_ctx, engine.dtype
        # the token id: the host writes it into pinned memory, the step copies it up itself (in a
        # graph, a copy node reading the value at replay): no fill kernel queued before a replay
        self.tok_host = torch.zeros(1, dtype=torch.long, pin_memory=self.cuda)
        self._tok_np = self.tok_host.numpy()
        self.tok = torch.zeros(1, dtype=torch.long, device=dev) if self.cuda else self.tok_host
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos_value = 0  # what self.pos holds once the queued work has run
        self.kpos = torch.arange(n_ctx, device=dev)
        self.hs = torch.zeros(cfg.num_layers, 1, cfg.hidden_size, dtype=dt, device=dev)
        # per MoE layer its routed ids [n, k], then per layer how many of them the slot table
        # lacked [n]: one buffer the host reads back per token with the logits, into pinned memory
        # (one wait). The misses start 16-byte aligned and the ids rows keep their own layout:
        # inductor copies a misaligned input in and out of a compiled call (on the H200 a row
        # layout of k + 1 cost two more kernels in every other layer, +40 us per token)
        n, k = max(1, len(self.order)), cfg.top_k
        self.at = (n * k + 1) // 2 * 2
        self.route = torch.zeros(self.at + n, dtype=torch.long, device=dev)
        self.ids, self.misses = self.route[:n * k].view(n, k), self.route[self.at:]
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.route_host = torch.zeros_like(self.route, device="cpu", pin_memory=self.cuda)
        self.logits_host = torch.zeros_like(self.logits, device="cpu", pin_memory=self.cuda)
        self.read = torch.cuda.Event() if self.cuda else None
        self.zero = torch.zeros(1, cfg.hidden_size, dtype=dt, device=dev)
        self.args = [self._layer_args(i) for i in range(cfg.num_layers)]
        self.consts = dict(heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                           eps=cfg.rms_norm_eps, qk_norm=cfg.qk_norm, clip=cfg.clip_qkv,
                           window=cfg.sliding_window or 0, scale=1.0 / math.sqrt(cfg.head_dim),
                           fold=decode_fuse.FOLDS)  # kernels/decode_fuse.py's folds (a static argument)
        self.ops = Ops.get(compile=self.cuda and mode in ("on", "eager"))
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.ws = None
        if self.native:
            self.ws = torch.zeros(engine.backend.workspace(dev, cfg.top_k, engine.store.layout.intermediate).numel(),
                                  dtype=torch.uint8, device=dev)
        self.graph, self.graphs, self.captured = None, [], False
        self.nodes: dict = {}
        self.kernel_mode = "auto"
        self.why_not = "" if mode == "on" and self.cuda and self.native else \
            ("not captured: " + ("CPU run (twin)" if not self.cuda else
                                 "eager mode" if mode != "on" else "no native CUDA kernel for this format"))
        self.steps = self.replays = self.fallbacks = 0
        if not self.why_not:  # compile and capture now, so that the first token is not slow
            with torch.inference_mode():
                self._capture()

    # ------------------------------------------------------------------ the step's parts
    def _layer_args(self, i: int) -> dict:
        """Layer i's tensors for decode_ops.attention. q, k and v weights are fused into one
        matrix (one GEMV instead of three); the decoder's own q/k/v become row views of it."""
        w, p, c = self.model.w, f"layers.{i}.attn.", self.cfg
        names = [p + f"{n}.weight" for n in "qkv"]
        wqkv = concat_rows([w[n] for n in names])  # packed weights (dense_quant): one stack, no copy
        bqkv = torch.cat([w[p + f"{n}.bias"] for n in "qkv"]) if c.qkv_bias else None
        nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for n, (a, b) in zip("qkv", ((0, nq), (nq, nq + nk), (nq + nk, nq + 2 * nk))):
            if isinstance(wqkv, torch.Tensor):
                w[p + f"{n}.weight"] = wqkv[a:b]
            if bqkv is not None:
                w[p + f"{n}.bias"] = bqkv[a:b]
        return dict(norm_w=w[f"layers.{i}.attn_norm.weight"], wqkv=wqkv, bqkv=bqkv, q_norm=w.get(p + "q_norm.weight"),
                    k_norm=w.get(p + "k_norm.weight"), K=self.kv.k[i], V=self.kv.v[i], wo=w[p + "o.weight"])

    def _experts_of(self, layer, x, ids, weights, h, addrs, fast: bool):
        """The routed experts: through the device-side slot table (fast), or the engine's
        per-layer pager path (demand reads, copies, host compute, prefetch)."""
        e = self.e
        if not fast:
            return e._experts(layer, x, ids, weights, h)
        if self.native:
            return e.backend.moe_addresses(x, addrs, weights[0], e.store.layout, self.ws, self.kernel_mode)
        slots = self.table.entries[self.table.rows[layer]].index_select(0, ids[0]).tolist()
        rows = e.pager.t0.slots
        return e.backend.moe_decode(x, [rows[s] for s in slots], weights[0], e.store.layout)

    def _body(self, start: int, fast: bool):
        """Layers start.. of the token at self.pos, the logits, then the position advances."""
        c, m, w, ops, t = self.cfg, self.model, self.model.w, self.ops, self.table
        h = embed(self.token(), w["embed.weight"]) if start == 0 else self.hs[start].clone()
        delta = self.zero
        cos, sin = ops.rope_tables(self.pos, m.inv_freq, self.hs.dtype)
        for i in range(start, c.num_layers):
            p, at = f"layers.{i}.", dict(cos=cos, sin=sin, pos=self.pos, kpos=self.kpos, **self.args[i], **self.consts)
            if i in t.rows:
                r = t.rows[i]
                h, x, ids, wts, addrs = ops.moe_layer(
                    h, delta, self.hs[i], ffn_norm=w[p + "ffn_norm.weight"], router_w=w[p + "moe.router.weight"],
                    ids_row=self.ids[r], entries_row=t.entries[r], base=t._base, top_k=c.top_k,
                    norm_topk=c.norm_topk_prob, stride=t._stride, **at)
                delta = self._experts_of(i, x, ids, wts, h, addrs, fast)
                if c.shared_expert_intermediate_size:
                    delta = delta + m.shared(i, x)
            else:
                h = ops.attention(h, delta, self.hs[i], **at)
                delta = m.ffn(i, h, None)
        self._end(h, delta)

    def token(self) -> torch.Tensor:
        """The step's token id on the device (copied from the host's pinned value on CUDA)."""
        if self.cuda:
            self.tok.copy_(self.tok_host, non_blocking=True)
        return self.tok

    def _end(self, h, delta):
        """The token's last kernels: the layers' misses counted, the logits, the position advanced."""
        c, m = self.cfg, self.model
        if self.table.rows:
            self.ops.missing(self.table.present, self.ids, self.misses)
        self.ops.head(h, delta, m.w["norm.weight"], m.lm_head, self.logits, c.rms_norm_eps)
        self.pos.add_(1)

    # ------------------------------------------------------------------ a decode step
    def step(self, token: int, n_past: int) -> torch.Tensor:
        """Logits [1, vocab] of one token at position n_past (a host copy of the static buffer);
        its K/V are written to the engine's cache. The whole-token graph replays on the caller's
        stream (no stream switch or cross-stream waits between two tokens, host work the GPU would
        idle through); everything else runs on the decode stream, the one the graph was captured
        on, so eager steps make the same cuBLAS choices."""
        self.steps += 1
        self._tok_np[0] = token  # the last step's copy of it has run: its read-back was waited for
        if len(self.graphs) == 1 and self.mode == "on" and self.pos_value == n_past:
            self.pos_value = n_past + 1
            self.table.ready()
            self.graph.replay()
            self.replays += 1
            self._settle()
            return self.logits_host.clone()
        with self._on_stream():
            if self.pos_value != n_past:
                self.pos.fill_(n_past)
            self.pos_value = n_past + 1
            self.table.ready()
            self._run()
        return self.logits_host.clone()

    def _run(self):
        """The token's layers: replayed (or run fast) and settled, or eager."""
        if self.mode == "eager":
            self._body(0, fast=False)
            self._read_back()
            return
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self._body(0, fast=True)
        self._settle()

    @contextlib.contextmanager
    def _on_stream(self):
        """On CUDA: the decode stream, after the caller's stream's work and before its next."""
        cur = torch.cuda.current_stream(self.e.device) if self.cuda else None
        if cur is None or cur == self.stream:
            yield
            return
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            yield
        cur.wait_stream(self.stream)

    def _read_back(self):
        """The logits and the routing rows to pinned host memory; the host waits once, here."""
        self.route_host.copy_(self.route, non_blocking=self.cuda)
        self.logits_host.copy_(self.logits, non_blocking=self.cuda)
        if self.cuda:
            self.read.record()  # the current stream: the caller's (a replay) or the decode stream
            self.read.synchronize()

    def _settle(self, skip=frozenset()):
        """With the token's kernels queued: the previous token's policy touches (the GPU is busy
        meanwhile), then the one wait for the logits and the routing; the hits counted (their
        touches left to the next token's settle, or the pager's next request), or the token
        recomputed from the first layer that missed (`skip`: layers whose experts were never
        looked up, HybridDecode's CPU layers)."""
        e, p, k, at = self.e, self.e.pager, self.cfg.top_k, self.at
        p.touch_noted()
        self._read_back()
        flat = self.route_host.tolist()
        hit = []
        for row, layer in enumerate(self.order):
            if layer in skip:
                continue
            if flat[at + row]:  # a miss: the layers before it hit, this one and the rest are redone
                self._note(hit)
                self.fallbacks += 1
                with self._on_stream():
                    self.pos.sub_(1)
                    self._body(layer, fast=False)
                    self._read_back()
                return
            hit.append((layer, flat[row * k:(row + 1) * k]))
        self._note(hit)

    def _note(self, hit):
        """The hits of a step's layers, counted now, their trace records and touches left for
        later (the next token's replay is queued first: ~0.2 ms of Python with a trace on)."""
        self.e.pager.note_step(hit, later=True, routed=True)

    def _pieces(self) -> list:
        """What one step runs, as the callables captured one graph each (here the whole token;
        HybridDecode: its segments between CPU layers, replayed in order)."""
        return [lambda: self._body(0, fast=True)]

    def _capture(self):
        """Warm up on a side stream (compilation, lazy initialisations), then capture one step at
        the current position (it writes nothing a real step would not overwrite), one graph per
        piece in one memory pool. Tried in order: the compiled ops with the cooperative MoE
        launch, then with two plain launches, then the ops as written; if nothing captures, steps
        stay uncaptured and `why_not` says why."""
        cur, side = torch.cuda.current_stream(self.e.device), self.stream
        tries = [("auto", True), ("two", True), ("auto", False), ("two", False)]
        for kmode, compiled in tries:
            if compiled and not self.ops.compiled:
                continue
            self.kernel_mode = kmode
            side.wait_stream(cur)
            try:
                with torch.cuda.stream(side):
                    for piece in self._pieces():
                        piece()
                    self.pos.sub_(1)
                cur.wait_stream(side)
                pool, graphs, nodes = torch.cuda.graph_pool_handle(), [], {}
                for piece in self._pieces():
                    g = _new_graph()
                    with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
                        piece()
                    for kind, n in _graph_nodes(g).items():
                        nodes[kind] = nodes.get(kind, 0) + n
                    if hasattr(g, "instantiate"):
                        g.instantiate()
                    graphs.append(g)
                self.graphs, self.nodes = graphs, nodes
                self.graph, self.captured, self.why_not = graphs[-1], True, ""
                return
            except Exception as err:  # noqa: BLE001 - a launch or a compilation the capture cannot take
                cur.wait_stream(side)
                torch.cuda.synchronize(self.e.device)
                self.pos.fill_(self.pos_value)
                self.graphs = []
                self.why_not = f"capture failed ({kmode}, compiled={compiled}): {type(err).__name__}: {err}"[:500]
                if compiled and kmode == "two":
                    self.ops.uncompile(self.why_not)
        self.kernel_mode = "auto"

    def kernels_per_step(self) -> int | None:
        """Kernel nodes in the captured graph (None when not captured or not countable)."""
        return self.nodes.get("kernel") if self.graph is not None and self.nodes else None

    def close(self):
        self.captured, self.graph, self.graphs = self.graph is not None, None, []
        self.table.detach()


def _new_graph():
    try:
        return torch.cuda.CUDAGraph(keep_graph=True)  # keeps the cudaGraph_t, to count its nodes
    except TypeError:  # an older torch
        return torch.cuda.CUDAGraph()


def _graph_nodes(g) -> dict:
    """Node counts of a captured graph by type ({"kernel": n, "memcpy": n, ...}; {} when the
    runtime or torch cannot say), read with cudaGraphGetNodes / cudaGraphNodeGetType."""
    import ctypes
    try:
        raw = ctypes.c_void_p(g.raw_cuda_graph())
        major = (torch.version.cuda or "").split(".")[0]
        lib = ctypes.CDLL(f"libcudart.so.{major}" if major else "libcudart.so")
        n = ctypes.c_size_t(0)
        if lib.cudaGraphGetNodes(raw, None, ctypes.byref(n)) != 0:
            return {}
        nodes = (ctypes.c_void_p * n.value)()
        if lib.cudaGraphGetNodes(raw, nodes, ctypes.byref(n)) != 0:
            return {}
        names = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty"}
        out: dict = {}
        for node in nodes[:n.value]:
            t = ctypes.c_int(-1)
            lib.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t))
            out[names.get(t.value, "other")] = out.get(names.get(t.value, "other"), 0) + 1
        return out
    except (AttributeError, OSError, RuntimeError, TypeError):
        return {}
