"""Engine: a store loaded for inference. Dense weights resident on the compute device, a
preallocated KV cache, routed experts served by the pager and computed by a kernel backend.

    eng = Engine("./store", device="cpu", n_ctx=2048, ram_budget="2G")
    logits = eng.forward(token_ids)        # [T, vocab] float32; appends to the KV cache
    eng.truncate(n) / eng.reset()          # drop cached positions
"""
from __future__ import annotations

import torch

from .. import kernels
from ..models.layers import Decoder, KVCache
from ..pager.pager import ExpertPager
from ..sizes import parse_size
from ..store.format import Store


class ContextError(ValueError):
    pass


def resolve_device(device) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible to torch on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' requested but Metal is not available on this machine")
    return dev


class Engine:
    def __init__(self, store, device="cpu", n_ctx: int = 2048, ram_budget=None, policy: str = "lru",
                 backend: str | None = None, dtype: torch.dtype | None = None, n_batch: int = 512,
                 io_threads: int = 4, direct_io: bool = False, verify: bool = True):
        self.store = store if isinstance(store, Store) else Store.open(store)
        self.config = cfg = self.store.config
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.bfloat16)
        self.backend = kernels.select(self.device.type, backend)
        self.model = Decoder(cfg, self.store.load_dense(self.device, self.dtype))
        self.n_ctx, self.n_batch = int(n_ctx), int(n_batch)
        self.kv = KVCache(cfg, self.n_ctx, self.dtype, self.device)
        self.pager = ExpertPager(self.store, parse_size(ram_budget), policy=policy, io_threads=io_threads,
                                 direct_io=direct_io, verify=verify)
        self.tokens: list[int] = []
        self._tokenizer = None
        self.trace = None

    def record(self, trace):
        """Attach a pager.trace.RoutingTrace (routes and pager requests are recorded into it);
        None detaches. Off by default."""
        self.trace = self.pager.trace = trace

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_folder(self.store.path, self.config)
        return self._tokenizer

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self):
        self.tokens = []

    def truncate(self, n: int):
        """Keep only the first n cached positions (later K/V slots are simply overwritten)."""
        self.tokens = self.tokens[:n]

    @torch.inference_mode()
    def forward(self, tokens, last_only: bool = False) -> torch.Tensor:
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
            t = torch.tensor(chunk, dtype=torch.long, device=self.device)
            if self.trace is not None:
                self.trace.begin(self.n_past, len(chunk))
            logits = self.model.forward(t, self.n_past, self.kv, self._experts, last_only=last)
            self.tokens += chunk
            if not last_only or last:
                outs.append(logits.cpu())
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Routed experts of one layer. Decode: one fused call over the token's k experts.
        Prefill: each expert used by the chunk is loaded once and runs all its tokens as a
        matrix product; experts go through the pool in groups that fit it."""
        layout, be = self.store.layout, self.backend
        if self.trace is not None:
            self.trace.route(layer, ids)
        if x.shape[0] == 1:
            records = self._on_device(self.pager.acquire(layer, ids[0].tolist()))
            return be.moe_decode(x, records, weights[0], layout)
        out = torch.zeros_like(x)
        used = torch.unique(ids).tolist()
        step = self.pager.capacity
        for g in range(0, len(used), step):
            group = used[g:g + step]
            for e, rec in zip(group, self._on_device(self.pager.acquire(layer, group))):
                tok, slot = torch.where(ids == e)
                y = be.expert_ffn(x[tok], rec, layout) * weights[tok, slot, None]
                out.index_add_(0, tok, y)
        return out

    def _on_device(self, records):
        if self.device.type == "cpu":
            return records
        return [r.to(self.device, non_blocking=True) for r in records]

    def close(self):
        self.pager.close()
