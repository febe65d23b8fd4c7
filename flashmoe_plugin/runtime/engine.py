"""Engine: a store loaded for inference. Dense weights resident on the compute device, a
preallocated KV cache, routed experts served by the pager and computed by a kernel backend.

    eng = Engine("./store", device="cuda", n_ctx=2048, vram_budget="8G", ram_budget="16G")
    Engine("./store", experts_per_token=4)  # route 4 experts per token, not the checkpoint's top_k
    logits = eng.forward(token_ids)        # [T, vocab] float32; appends to the KV cache
    eng.truncate(n) / eng.reset()          # drop cached positions
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import kernels
from ..kernels.ggml_numerics import numerics_for
from ..models.layers import decoder_for
from ..pager.pager import PREFETCH, ExpertPager, default_direct_io
from ..pager.predictor import Predictor
from ..sizes import available_ram, format_size, parse_size, ram_reserve, working_set
from ..store.model import open_model
from . import dense_quant as dense_quant_mod
from .graph_decode import DeviceDecode, graph_mode
from .cpu_layers import CpuLayers
from .torch_threads import torch_on_one_thread
from .host_compute import HostCompute
from .hybrid_decode import HybridDecode, cut_layers
from . import landed as landed_mod


class ContextError(ValueError):
    pass


def with_experts_per_token(cfg, k: int | None):
    """The config routing k experts per token instead of the checkpoint's top_k (None: as is)."""
    if k is None or int(k) == cfg.top_k:
        return cfg
    if not 1 <= int(k) <= cfg.num_experts:
        raise ValueError(f"experts_per_token={k}: must be between 1 and the model's {cfg.num_experts} experts")
    return replace(cfg, top_k=int(k))


def resolve_device(device) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible to torch on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but Metal is not available on this machine")
    return dev


class Engine:
    def __init__(self, store, device="cpu", n_ctx: int = 2048, ram_budget=None, policy: str = "auto",
                 backend: str | None = None, dtype: torch.dtype | None = None, n_batch: int = 512,
                 io_threads: int = 4, direct_io: bool | None = None, verify: bool = True, vram_budget=None,
                 prefetch="auto", prefetch_depth: int | None = None, host_compute: str = "auto", n_cpu_moe: int = 0,
                 pager_options: dict | None = None, storage: str = "native", storage_options: dict | None = None,
                 experts_per_token: int | None = None, decode_graph: str = "auto", dense_quant: str | None = "auto"):
        self.store = open_model(store)
        self.config = cfg = with_experts_per_token(self.store.config, experts_per_token)
        self.device = resolve_device(device)
        self.backend = kernels.select(self.device.type, backend)
        free = available_ram()  # before the dense part: a mapped (file-backed) dense part still counts as free after
        dense, self.dtype = self._load_dense(dtype, dense_quant)
        self._ram_free = free - dense_quant_mod.dense_bytes({k: w for k, w in dense.items() if w.device.type == "cpu"})
        self.model = decoder_for(cfg)(cfg, dense)
        self.model.numerics = numerics_for(self.store, self.backend)  # a GGUF: llama.cpp's float order
        # refused here, before the pager pins host memory that a failed constructor would leave registered
        graph, self.decode_graph_reason = graph_mode(decode_graph, self)
        self.n_ctx, self.n_batch = int(n_ctx), int(n_batch)
        self.kv = self.model.new_cache(self.n_ctx, self.dtype, self.device)
        # n_cpu_moe: the first N MoE layers' experts live in RAM and run on the CPU (llama.cpp's meaning)
        self.cpu_layers = CpuLayers(self.store, int(n_cpu_moe), self.device, io_threads, verify,
                                    self.backend) if n_cpu_moe else None
        of = self.store.expert_bytes  # a budget of "50%" is half the experts' bytes
        budget, host_budget = self._budgets(parse_size(ram_budget, of, "ram_budget"),
                                            parse_size(vram_budget, of, "vram_budget"))
        opts = {"device": self.device, "host_budget": host_budget, "storage": storage,
                "storage_options": storage_options, **(pager_options or {})}
        self.pager = ExpertPager(self.store, budget, policy=policy, io_threads=io_threads,
                                 direct_io=self._direct_default(free) if direct_io is None else direct_io, verify=verify, **opts)
        if self.cpu_layers is not None:
            # n_cpu_moe is a static placement: the other layers' experts go to the device tier at start when
            # they all fit (llama.cpp's too), so no decode step waits on the disk for one the prompt never chose
            paged = [(l, e) for l in sorted(self.store.layers) if l not in self.cpu_layers
                     for e in range(self.store.layers[l].experts)]
            if len(paged) <= self.pager.capacity:
                self.pager.preload(paged)
        self.predictor = None
        mode = {True: "auto", False: "off", None: "off"}.get(prefetch, prefetch)
        if mode != "off":
            if prefetch_depth is None and self.device.type != "cpu":
                prefetch_depth = 1  # each guess reads routing back from the GPU: deeper is unmeasured there
            self.predictor = self.pager.predictor = Predictor(mode, prefetch_depth)
        self.host_compute = HostCompute(host_compute, self.pager, self.store.layout, self.device,
                                        self.model.expert_act)
        self._moe_order = [i for i in range(cfg.num_layers) if i in self.store.layers]
        self._moe_pos = {layer: i for i, layer in enumerate(self._moe_order)}
        self.tokens: list[int] = []
        self._tokenizer = None
        self.trace = None
        # decode steps with routing, expert lookup and position on the device (runtime/graph_decode.py)
        # (with n_cpu_moe layers: cut into segments at their experts, runtime/hybrid_decode.py)
        # (cut at every MoE layer when the device tier cannot hold every expert: the pager's path per layer)
        self.fast = (HybridDecode if cut_layers(self) else DeviceDecode)(self, graph) if graph != "off" else None

    def _load_dense(self, dtype, dense_quant):
        """The dense weights and the activation dtype: fp32 on CPU (the oracles' tolerances and the
        chunked-prefill checks are fp32's), bf16 on GPUs, unless asked. `dtype=torch.bfloat16` on
        CPU keeps a bf16 store's dense part as stored (half the RAM of the fp32 copy, no second
        copy), at bf16's precision for the activations; that is also the CPU default when the
        experts and an fp32 dense part together exceed the free RAM (the 3.2 GB fp32 would cost
        Mixtral a third of a token's expert cache there: RAM is better spent on experts).
        dense_quant (runtime/dense_quant.py) keeps the matrices packed (q8/q4, or a GGUF's own
        blocks) and computes them by the kernel backend."""
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
            if self.device.type == "cpu" and self.store.expert_bytes + 2 * self._dense_stored_bytes() > available_ram():
                dtype = torch.bfloat16
        self.dense_quant = dense_quant_mod.resolve(dense_quant, self.store, self.device, available_ram(), dtype)
        return dense_quant_mod.load(self.store, self.dense_quant, self.device, dtype, self.backend), dtype

    def _direct_default(self, free: int) -> bool:
        """O_DIRECT when the free RAM cannot hold the experts beside the stored dense part."""
        return default_direct_io(self.store.expert_bytes + self._dense_stored_bytes(), free)

    def _dense_stored_bytes(self) -> int:
        return dense_quant_mod.stored_bytes(self.store)

    def _budgets(self, ram_budget, vram_budget) -> tuple[int | None, int | None]:
        """(device tier budget, host tier budget). CPU: the RAM budget is the device tier. CUDA:
        the VRAM budget (default: what is free after the dense part and the KV cache, less a
        reserve) over a pinned-RAM host tier (default: the experts VRAM cannot hold, up to the
        RAM budget's default). The RAM default is what is free (MemAvailable, or the memory
        cgroup's room) less the KV cache pages not touched yet and sizes.ram_reserve() (on CPU: of
        sizes.working_set, this engine's prefill chunk)."""
        total = self.store.expert_bytes - (self.cpu_layers.bytes if self.cpu_layers else 0)
        if ram_budget is None:
            kv = 0 if self.device.type == "cuda" else 2 * self.kv.k.numel() * self.kv.k.element_size()
            least = self.config.top_k * self.store.layout.size if self.device.type != "cuda" else 0
            reserve = ram_reserve() if self.device.type == "cuda" else \
                ram_reserve(working_set(self.config, self.n_batch, self.n_ctx))
            ram_budget = max(least, min(total, min(available_ram(), self._ram_free) - kv - reserve))
        if self.device.type != "cuda":
            if vram_budget is not None:
                raise ValueError(f"vram_budget applies to cuda devices; this engine runs on {self.device}")
            return ram_budget, 0
        free, _ = torch.cuda.mem_get_info(self.device)
        usable = free - max(1 << 30, free // 20)  # workspaces, activations, the allocator's slack
        if vram_budget is None:
            vram_budget = max(self.config.top_k * self.store.layout.size, min(total, usable))
        elif vram_budget > usable:
            raise ValueError(f"VRAM budget {format_size(vram_budget)} exceeds what is free on {self.device} after "
                             f"the dense weights and KV cache ({format_size(max(usable, 0))} usable)")
        # the host tier takes what the VRAM's whole records leave (not the budget's bytes: Mixtral's
        # 8G holds 86 records, and 26.6G - 8G made 169 more: one record short, read from disk per token)
        held = vram_budget // self.store.layout.size * self.store.layout.size
        return vram_budget, min(ram_budget, max(0, total - held))

    def record(self, trace):
        """Attach a pager.trace.RoutingTrace (routes and pager requests are recorded into it);
        None detaches. Off by default."""
        self.pager.touch_noted()  # a decode step's deferred records go to the trace they belong to
        self.trace = self.pager.trace = trace

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            folder = self.store.path
            if getattr(self.store, "meta", None) is not None:  # a GGUF file: its own vocabulary
                from .gguf_tokenizer import write_folder
                folder = write_folder(self.store.meta, self.store.path / "tokenizer", str(self.store.file))
            self._tokenizer = Tokenizer.from_folder(folder, self.config)
        return self._tokenizer

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self):
        self.tokens = []

    def truncate(self, n: int):
        """Keep only the first n cached positions (later K/V slots are simply overwritten; a
        recurrent state goes back to its nearest snapshot and the tokens from there are replayed)."""
        keep = self.tokens[:n]
        at = self.kv.rewind(len(keep))
        self.tokens = keep[:at]
        if at < len(keep):
            self.forward(keep[at:], last_only=True)

    @torch.inference_mode()
    def forward(self, tokens, last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """Logits of the new tokens (the last one only with last_only), or with hidden=True their
        final normalised hidden states."""
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
        if not tokens:
            raise ValueError("forward() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextError(f"{self.n_past + len(tokens)} tokens exceed the context window n_ctx={self.n_ctx}")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0..{self.config.vocab_size - 1})")
        outs = []
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            last = last_only and i + self.n_batch >= len(tokens)
            if self.trace is not None:
                self.trace.begin(self.n_past, len(chunk))
            if self.predictor is not None:
                self.predictor.end_sequence()
            if len(chunk) == 1 and self.fast is not None and not hidden:
                logits = self.fast.step(chunk[0], self.n_past)
            else:
                t = torch.tensor(chunk, dtype=torch.long, device=self.device)
                # a CPU decode step: torch's share on one thread, the native kernels on all (torch_threads.py)
                with torch_on_one_thread(len(chunk) == 1 and self.device.type == "cpu" and self.backend.name == "cpu"):
                    logits = self.model.forward(t, self.n_past, self.kv, self._experts, last_only=last, hidden=hidden)
            self.tokens += chunk
            if not last_only or last:
                outs.append(logits.cpu())
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 h: torch.Tensor, host=None) -> torch.Tensor:
        """Routed experts of one layer. Decode: the token's k records are requested, the
        predictor's prefetches for the next layers go out behind them, then one fused call.
        Prefill: each expert used by the chunk is loaded once and runs all its tokens as a matrix
        product while the next ones load; experts go through the device tier in groups that fit.
        Experts the fused kernels do not compute (gpt-oss's) go through Backend.expert_general.
        host: (x in fp32 on the host, the weights as floats) where the caller has them already
        (runtime/hybrid_decode.py's packed row): a decode step then reads nothing back."""
        layout, be = self.store.layout_of(layer), self.backend
        if self.trace is not None:
            self.trace.route(layer, ids)
        act = self.model.expert_act
        if self.cpu_layers is not None and layer in self.cpu_layers:
            return self.cpu_layers.forward(layer, x, ids, weights, act)
        if x.shape[0] == 1:
            chosen = ids[0].tolist()
            hc = self.host_compute
            landed = self.device.type == "cpu" and act is None and hc.mode == "off" \
                and layout.size >= landed_mod.MIN_RECORD_BYTES
            ask = self.pager.ready_first(layer, chosen) if landed else chosen
            batch = self.pager.request(layer, ask, host_ok=hc.share if hc.mode != "off" else False)
            if self.predictor is not None:  # copies up only beside the CPU's share of this layer
                self._look_ahead(layer, chosen, h, hc.cpu_time(len(batch.on_host)) if hc.mode != "off" else 0.0)
            if landed:  # resident experts computed while the missing ones are read (runtime/landed.py)
                return landed_mod.moe_as_landed(self.backend, x, batch, chosen, weights[0], layout)
            got = dict(batch)
            if not batch.on_host:
                return self._decode_sum(x, [got[e] for e in chosen], weights[0], layout)
            # host-tier records are computed on the CPU while the GPU runs the others: x goes to
            # the host before the GPU work is queued, so neither waits for the other
            xh, w = host if host is not None else (hc.to_host(x), weights[0].tolist())
            here = [i for i, e in enumerate(chosen) if e not in batch.on_host]
            out = self._decode_sum(x, [got[chosen[i]] for i in here], weights[0][here], layout) if here \
                else torch.zeros_like(x)
            there = [i for i, e in enumerate(chosen) if e in batch.on_host]
            return out + hc.run(xh, [got[chosen[i]] for i in there], [w[i] for i in there], x, layout)
        # tokens grouped per expert (a stable sort keeps each expert's (token, slot) pairs in
        # torch.where's order); each (token, slot) result lands in its place, then a token's k
        # results are summed with their weights: the same additions however experts are grouped
        k = ids.shape[1]
        flat = ids.reshape(-1)
        sorted_ids, order = torch.sort(flat, stable=True)
        xs = x[order // k]
        back = torch.empty_like(xs)
        E = self.store.layers[layer].experts
        if act is None and self.trace is None and E <= self.pager.capacity and \
                all(self.pager.resident(layer, e) for e in range(E)):
            # every expert resident: all of them in one call and nothing read back to the host
            # (the host queues the next layers while this one runs; all E count as hits)
            got = dict(self.pager.request(layer, range(E)))
            offs = torch.searchsorted(sorted_ids, torch.arange(E + 1, device=flat.device))
            back[order] = be.grouped_ffn(xs, [got[e] for e in range(E)], offs.diff(), layout, most=x.shape[0])
            return (back.view(-1, k, x.shape[-1]) * weights[..., None]).sum(1)
        # one read-back per layer (not one per expert)
        counts = torch.bincount(flat, minlength=1).tolist()
        start = [0]
        for c in counts:
            start.append(start[-1] + c)
        used = [e for e, c in enumerate(counts) if c]
        step = self.pager.capacity
        for g in range(0, len(used), step):
            group = used[g:g + step]
            got = dict(self.pager.request(layer, group))
            if act is None:  # the group's experts in one call (one grouped launch on CUDA)
                a, b = start[group[0]], start[group[-1] + 1]
                back[order[a:b]] = be.grouped_ffn(xs[a:b], [got[e] for e in group], [counts[e] for e in group], layout)
                continue
            for e in group:
                a, b = start[e], start[e + 1]
                back[order[a:b]] = be.expert_general(xs[a:b], got[e], layout, act)
        return (back.view(-1, k, x.shape[-1]) * weights[..., None]).sum(1)

    def _decode_sum(self, x: torch.Tensor, records, weights: torch.Tensor, layout) -> torch.Tensor:
        """sum_i weights[i] * expert_i(x) for one token: one fused call for SwiGLU experts."""
        act = self.model.expert_act
        if act is None:
            return self.backend.moe_decode(x, records, weights, layout)
        out = torch.zeros_like(x)
        for rec, w in zip(records, weights.tolist()):
            out.add_(self.backend.expert_general(x, rec, layout, act), alpha=w)
        return out

    def _look_ahead(self, layer: int, chosen: list[int], h: torch.Tensor, beside_s: float = 0.0):
        """Grade the guesses made for this layer; guess the next layers' experts from h and
        prefetch those the cost model allows."""
        pred, p = self.predictor, self.pager
        pred.observe(layer, chosen, p.stats.read_seconds)
        at = self._moe_pos[layer]
        js = self._moe_order[at + 1:at + 1 + pred.reach()]
        # copies up for the next layer that run while the CPU computes this one's host records
        # (HostCompute.copies_ahead; beside_s: that CPU time)
        ups = [self.host_compute.copies_ahead(beside_s if d == 1 else 0.0) for d in range(1, len(js) + 1)]
        if not any(ups) and p.total_capacity >= p.total_records:
            return  # nothing to read or copy: no guess (on a GPU each reads routing back)
        for d, (j, guess, margins) in enumerate(zip(js, *self.model.guess_scored(js, h)), 1):
            pred.guessed(j, guess, d, p.cold(j, guess), margins)
            # a disk read only for the guesses whose precision (at this distance and confidence) pays for it
            margin = dict(zip(guess, margins)) if margins is not None else {}
            disk, host = {e for e in guess if pred.allow(d, True, margin.get(e))}, pred.allow(d, False) and ups[d - 1]
            if disk or host:  # the layer needed soonest is read first; a newer guess replaces older ones
                self.pager.prefetch(j, guess, from_disk=disk, from_host=host, priority=PREFETCH - at - d, replace=True)

    def close(self):
        if self.trace is not None:  # the trace gets the last decode step's records
            self.pager.touch_noted()
        if self.fast is not None:
            self.fast.close()
        self.pager.close()
        if self.cpu_layers is not None:
            self.cpu_layers.close()
