"""`Llama`: a drop-in for `llama_cpp.Llama` (llama-cpp-python 0.3.x) over a flashmoe expert store.

    from flashmoe_plugin import Llama
    llm = Llama(model_path="./store", n_ctx=2048, ram_budget="2G", verbose=False)
    llm("Once upon a time", max_tokens=64)                     # same dict shapes as llama-cpp-python
    for chunk in llm.create_chat_completion(messages, stream=True): ...
    llm.eval(llm.tokenize(b"Hello")); llm.scores[llm.n_tokens - 1]

Everything here goes through the core's public API (Engine, Tokenizer, Sampler, chat.render,
the plugin manager's hooks); llama-cpp-python itself is never needed, except to use one of its
named `chat_format`s or a `chat_handler` object, which are called exactly as llama-cpp-python
calls them (they only use `tokenize` and `create_completion` of this object).

Where llama-cpp-python has a quirk that no caller can rely on, we do the sensible thing instead
(each is marked "differs:" below); dict shapes, keys, value types, defaults, the order of stream
chunks, the seed chain and the error messages are the same.
"""
from __future__ import annotations

import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from flashmoe_plugin.runtime.generate import common_prefix, stop_holdback, utf8_complete

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"

# llama.cpp's names for our architectures (GGUF `general.architecture`), so `metadata` reads the same.
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}

# Special tokens llama.cpp treats as end-of-generation (llama-vocab.cpp) besides EOS itself.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "<|end_of_text|>")

# Fill-in-the-middle special tokens: (prefix, suffix, middle), tried in order.
_FIM = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        ("<PRE>", "<SUF>", "<MID>"))

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class LogitsProcessorList(List[LogitsProcessor]):
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(List[StoppingCriteria]):
    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any([criteria(input_ids, logits) for criteria in self])


class LlamaState:
    """What `save_state` returns (llama-cpp-python's attribute names; `llama_state` holds the
    KV tensors of the cached positions instead of llama.cpp's opaque bytes)."""

    def __init__(self, input_ids: np.ndarray, scores: np.ndarray, n_tokens: int, llama_state: Any,
                 llama_state_size: int, seed: int):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed


def _resolve_model_path(model_path) -> str:
    from flashmoe_plugin.models_path import resolve_model  # "demo" is the embedded model, as on the CLI
    try:
        return str(resolve_model(model_path))
    except ValueError:
        raise ValueError(f"Model path does not exist: {model_path}") from None


def _engine_kwargs(engine_cls, wanted: dict) -> dict:
    """Pass the flashmoe options the Engine knows (unset ones keep the Engine's defaults)."""
    import inspect
    params = inspect.signature(engine_cls.__init__).parameters
    return {k: v for k, v in wanted.items() if k in params and v is not None}


def _llama_float(x: float) -> str:
    return f"{float(x):f}"  # std::to_string, as llama.cpp prints float metadata


def _logprobs_of(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    m = np.max(x)
    if not np.isfinite(m):
        m = 0.0
    z = x - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z)))


class Llama:
    """A flashmoe expert store behind llama-cpp-python's `Llama` interface."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        logits_all: bool = False,
        last_n_tokens_size: int = 64,
        chat_format: Optional[str] = None,
        chat_handler: Optional[Callable[..., Any]] = None,
        verbose: bool = True,
        # flashmoe options
        device: str = "cpu",
        ram_budget: Union[int, str, None] = None,
        vram_budget: Union[int, str, None] = None,
        cache_policy: str = "auto",
        prefetch: Union[bool, str] = True,  # True = "auto" (prefetch while it measurably pays), "on", False/"off"
        backend: Optional[str] = None,
        **kwargs,  # other llama.cpp options (n_gpu_layers, use_mmap, type_k, ...) are accepted and ignored
    ):
        from flashmoe_plugin.plugins import manager
        from flashmoe_plugin.runtime.engine import Engine
        from flashmoe_plugin.store.model import open_model

        self.verbose = verbose
        self.model_path = _resolve_model_path(model_path)
        store = open_model(self.model_path)
        if n_ctx == 0:  # llama.cpp: 0 = the model's training context
            n_ctx = store.config.max_position_embeddings
        self.n_batch = min(int(n_batch), int(n_ctx))
        if n_threads is not None and n_threads > 0:
            torch.set_num_threads(int(n_threads))
        self.n_threads = n_threads
        self.device, self.ram_budget, self.vram_budget = device, ram_budget, vram_budget
        self.cache_policy, self.prefetch, self.backend = cache_policy, prefetch, backend
        opts = dict(device=device, n_ctx=int(n_ctx), ram_budget=ram_budget, policy=cache_policy,
                    backend=backend, n_batch=self.n_batch, vram_budget=vram_budget, prefetch=prefetch)
        for k in ("io_threads", "direct_io", "verify", "dtype", "prefetch_depth", "host_compute", "storage",
                  "storage_options"):
            if k in kwargs:
                opts[k] = kwargs[k]
        t0 = time.perf_counter()
        self._engine = Engine(store, **_engine_kwargs(Engine, opts))
        self._hooks = manager().hook
        self._closed = False

        tok = self._engine.tokenizer
        self._tok = tok
        self._seed = seed or LLAMA_DEFAULT_SEED
        self._logits_all = bool(logits_all)
        self.last_n_tokens_size = int(last_n_tokens_size)
        self._n_ctx = int(self._engine.n_ctx)
        self._n_vocab = int(self._engine.config.vocab_size)
        self.cache = None
        self._rows_wanted = False
        self.input_ids: np.ndarray = np.zeros((self._n_ctx,), dtype=np.intc)
        # n_ctx x n_vocab always (np.zeros is calloc: untouched rows cost no memory). With
        # logits_all every evaluated row is kept; without, the last row of each eval (so
        # scores[n_tokens - 1] are always the current logits). differs: llama-cpp-python keeps
        # n_batch rows and leaves them empty without logits_all.
        self.scores: np.ndarray = np.zeros((self._n_ctx, self._n_vocab), dtype=np.single)
        self._row_ok = np.zeros((self._n_ctx,), dtype=bool)
        self._eog = self._end_of_generation_ids()
        self.metadata: Dict[str, str] = self._build_metadata()

        self.chat_format = chat_format
        self.chat_handler = chat_handler
        self._chat_handlers: Dict[str, Callable[..., Any]] = {}
        if tok.chat_template:
            self._chat_handlers["chat_template.default"] = _template_chat_handler(
                tok.chat_template, bos_token=tok.bos_token if tok.bos_id is not None else "",
                eos_token=tok.eos_token if tok.eos_id is not None else "")
            if self.chat_format is None and self.chat_handler is None:
                self.chat_format = "chat_template.default"
        if verbose:
            c = self._engine.config
            print(f"flashmoe: {self.model_path}: {store.architecture}, {c.num_layers} layers, {c.num_experts} experts "
                  f"(top-{c.top_k}), experts {store.quant}; n_ctx {self._n_ctx}, device {self._engine.device}, "
                  f"expert pool {self._engine.pager.capacity} records; loaded in {time.perf_counter() - t0:.2f} s",
                  file=sys.stderr)

    # ------------------------------------------------------------------ model facts
    def _end_of_generation_ids(self) -> set[int]:
        tok, cfg = self._tok, self._engine.config
        ids: set[int] = set()
        for e in (tok.eos_id, cfg.eos_token_id):
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(i) for i in e)
        gen_cfg = Path(self.model_path) / "generation_config.json"
        if gen_cfg.is_file():
            try:
                e = json.loads(gen_cfg.read_text()).get("eos_token_id")
                ids.update([e] if isinstance(e, int) else [int(i) for i in e or []])
            except (ValueError, TypeError):
                pass
        for text in _EOG_TEXTS:  # only where it is one special token of this vocabulary
            t = tok.encode(text, add_bos=False, special=True)
            if len(t) == 1 and tok.decode(t, special=False) == b"" and t[0] != tok.bos_id:
                ids.add(t[0])
        return {i for i in ids if 0 <= i < self._n_vocab}

    def _build_metadata(self) -> Dict[str, str]:
        c, store, tok = self._engine.config, self._engine.store, self._tok
        a = _GGUF_ARCH.get(c.architecture, c.architecture)
        m = {
            "general.architecture": a,
            "general.name": Path(self.model_path).name,
            f"{a}.context_length": str(c.max_position_embeddings),
            f"{a}.embedding_length": str(c.hidden_size),
            f"{a}.block_count": str(c.num_layers),
            f"{a}.attention.head_count": str(c.num_heads),
            f"{a}.attention.head_count_kv": str(c.num_kv_heads),
            f"{a}.attention.key_length": str(c.head_dim),
            f"{a}.attention.value_length": str(c.head_dim),
            f"{a}.attention.layer_norm_rms_epsilon": _llama_float(c.rms_norm_eps),
            f"{a}.rope.freq_base": _llama_float(c.rope_theta),
            f"{a}.expert_count": str(c.num_experts),
            f"{a}.expert_used_count": str(c.top_k),
            f"{a}.expert_feed_forward_length": str(c.moe_intermediate_size),
            f"{a}.vocab_size": str(c.vocab_size),
            "tokenizer.ggml.add_bos_token": "true" if tok.add_bos else "false",
            "flashmoe.store.version": str(store.manifest.get("version")),
            "flashmoe.store.architecture": store.architecture,
            "flashmoe.quant": store.quant,
        }
        if c.dense_intermediate_size:
            m[f"{a}.feed_forward_length"] = str(c.dense_intermediate_size)
        if c.shared_expert_intermediate_size:
            m[f"{a}.expert_shared_feed_forward_length"] = str(c.shared_expert_intermediate_size)
        if c.sliding_window:
            m[f"{a}.attention.sliding_window"] = str(c.sliding_window)
        if tok.bos_id is not None:
            m["tokenizer.ggml.bos_token_id"] = str(tok.bos_id)
        if tok.eos_id is not None:
            m["tokenizer.ggml.eos_token_id"] = str(tok.eos_id)
        if tok.chat_template:
            m["tokenizer.chat_template"] = tok.chat_template
        return m

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def n_embd(self) -> int:
        return int(self._engine.config.hidden_size)

    def token_eos(self) -> int:
        return -1 if self._tok.eos_id is None else int(self._tok.eos_id)

    def token_bos(self) -> int:
        return -1 if self._tok.bos_id is None else int(self._tok.bos_id)

    def token_nl(self) -> int:
        t = self._tok.encode("\n", add_bos=False, special=False)
        return int(t[0]) if len(t) == 1 else -1

    @property
    def pager_stats(self) -> Dict[str, Any]:
        """The expert pager's counters (hits, misses, evictions, bytes_read, read_seconds, hit_rate)."""
        return self._engine.pager.stats.snapshot()

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        """Text (UTF-8 bytes, or str) to ids; BOS only when asked and the model wants one."""
        return list(self._tok.encode(text, add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int], prev_tokens: Optional[Sequence[int]] = None,
                   special: bool = False) -> bytes:
        return self._tok.decode([int(t) for t in tokens], special=special)

    # ------------------------------------------------------------------ state
    @property
    def n_tokens(self) -> int:
        return len(self._engine.tokens)

    @n_tokens.setter
    def n_tokens(self, n: int):
        self._engine.truncate(max(0, int(n)))

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[: self.n_tokens, :]

    @property
    def eval_tokens(self):
        from collections import deque
        return deque(self._input_ids.tolist(), maxlen=self._n_ctx)

    def reset(self):
        """Forget the cached tokens (the next eval starts at position 0)."""
        self._engine.reset()

    def set_seed(self, seed: int):
        self._seed = seed

    def set_cache(self, cache):
        """A llama_cpp.LlamaRAMCache / LlamaDiskCache (or anything with their mapping interface)."""
        self.cache = cache

    def eval(self, tokens: Sequence[int]):
        """Append tokens to the context (batched by n_batch inside the engine) and record their
        logits in `scores`: every row with logits_all=True, else the last one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        n_past = self.n_tokens
        if n_past + len(tokens) > self._n_ctx:
            raise ValueError(f"Requested tokens ({n_past + len(tokens)}) exceed context window of {self._n_ctx}")
        all_rows = self._logits_all or self._rows_wanted
        logits = self._engine.forward(tokens, last_only=not all_rows)
        end = n_past + len(tokens)
        self.input_ids[n_past:end] = tokens
        if all_rows:
            self.scores[n_past:end, :] = logits.float().numpy()
            self._row_ok[n_past:end] = True
        else:
            self.scores[end - 1, :] = logits[-1].float().numpy()
            self._row_ok[n_past:end - 1] = False
            self._row_ok[end - 1] = True

    def save_state(self) -> LlamaState:
        n = self.n_tokens
        kv = self._engine.kv
        k, v = kv.k[:, :n].clone(), kv.v[:, :n].clone()
        size = k.numel() * k.element_size() * 2 + n * self._n_vocab * 4
        return LlamaState(input_ids=self.input_ids.copy(), scores=self.scores[:n, :].copy(), n_tokens=n,
                          llama_state={"k": k, "v": v, "row_ok": self._row_ok[:n].copy()},
                          llama_state_size=size, seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        n = int(state.n_tokens)
        if n > self._n_ctx:
            raise ValueError(f"state holds {n} tokens; this context window holds {self._n_ctx}")
        kv = self._engine.kv
        kv.k[:, :n].copy_(state.llama_state["k"])
        kv.v[:, :n].copy_(state.llama_state["v"])
        self.input_ids = state.input_ids.copy()
        self.scores[:n, :] = state.scores
        self._row_ok[:] = False
        self._row_ok[:n] = state.llama_state.get("row_ok", True)
        self._engine.tokens = [int(t) for t in state.input_ids[:n]]
        self._seed = state.seed

    # ------------------------------------------------------------------ sampling
    def _params(self, top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                presence_penalty, logit_bias=None, seed=None):
        from flashmoe_plugin.runtime.sampling import SamplingParams
        if temp < 0:  # llama.cpp: negative temperature = sample the full distribution
            temp, top_k, top_p, min_p, typical_p = 1.0, 0, 1.0, 0.0, 1.0
        seed = self._seed if seed is None else seed
        return SamplingParams(temperature=float(temp), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                              typical_p=float(typical_p), repeat_penalty=float(repeat_penalty),
                              frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
                              penalty_last_n=self.last_n_tokens_size,
                              logit_bias={int(k): float(v) for k, v in logit_bias.items()} if logit_bias else None,
                              seed=None if seed == LLAMA_DEFAULT_SEED else int(seed))

    @staticmethod
    def _unsupported(mirostat_mode=0, grammar=None):
        if mirostat_mode:
            raise NotImplementedError("mirostat sampling is not supported by flashmoe yet (use top_k/top_p/min_p)")
        if grammar is not None:
            raise NotImplementedError("grammar-constrained sampling is not supported by flashmoe yet")

    def _make_sampler(self, params, logits_processor=None):
        from flashmoe_plugin.runtime.sampling import Sampler
        sampler = Sampler(params)
        if logits_processor is None:
            return sampler

        def sample(logits: torch.Tensor, history: list[int]) -> int:
            row = logits.float().numpy().copy()
            row = logits_processor(np.asarray(history, dtype=np.intc), row)
            return sampler(torch.from_numpy(np.asarray(row, dtype=np.float32)), history)
        return sample

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
               mirostat_eta: float = 0.1, mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor=None, grammar=None, idx: Optional[int] = None) -> int:
        """Sample the next token from the logits of the last evaluated position (or `idx`)."""
        n = self.n_tokens
        assert n > 0, "sample() needs evaluated tokens (call eval first)"
        pos = n - 1 if idx is None else int(idx)
        if not self._row_ok[pos]:
            raise ValueError(f"no logits kept for position {pos} (create the Llama with logits_all=True)")
        self._unsupported(mirostat_mode, grammar)
        sampler = self._make_sampler(
            self._params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty, presence_penalty),
            logits_processor)
        return int(sampler(torch.from_numpy(self.scores[pos]), self._engine.tokens[: pos + 1]))

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None, grammar=None,
                 logit_bias: Optional[Dict[int, float]] = None):
        """Endless stream of sampled tokens after `tokens` (the caller stops it). With reset=True
        the longest cached prefix is kept and only the rest is evaluated. `send(list)` appends
        extra tokens to evaluate after the yielded one, as in llama-cpp-python."""
        self._unsupported(mirostat_mode, grammar)
        params = self._params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias)
        return self._generate(list(tokens), params, logits_processor, stopping_criteria, reset=reset)

    def _generate(self, tokens: list[int], params, logits_processor=None, stopping_criteria=None,
                  reset: bool = True, rows: bool = False) -> Iterator[int]:
        tokens = [int(t) for t in tokens]
        if not tokens and (reset or self.n_tokens == 0):
            raise ValueError("generate() needs at least one prompt token")
        sampler = self._make_sampler(params, logits_processor)
        eng = self._engine
        if reset and self.n_tokens > 0:
            cached = eng.tokens
            keep = self.longest_token_prefix(cached, tokens)
            if rows:  # rows of the kept prefix must exist too (echo with logprobs)
                missing = np.flatnonzero(~self._row_ok[:keep])
                keep = int(missing[0]) if len(missing) else keep
            if keep == len(tokens) == len(cached) and self._row_ok[keep - 1]:
                tokens = []  # exactly the cached context, logits at hand: sample right away
            else:
                keep = min(keep, len(tokens) - 1)  # re-evaluate at least one token for fresh logits
                eng.truncate(keep)
                tokens = tokens[keep:]
            reset = False
        if reset:
            self.reset()
        hooks = self._hooks
        while True:
            before = eng.pager.stats.snapshot()
            t0 = time.perf_counter()
            if tokens:
                self._rows_wanted = rows
                try:
                    self.eval(tokens)
                finally:
                    self._rows_wanted = False
            pos = self.n_tokens - 1
            token = int(sampler(torch.from_numpy(self.scores[pos]), eng.tokens))
            stats = eng.pager.stats.delta(before)
            stats.update(token=token, n_past=self.n_tokens, seconds=time.perf_counter() - t0)
            hooks.on_token(stats=stats)
            if stopping_criteria is not None:
                ids = np.append(self.input_ids[: self.n_tokens], np.intc(token))
                if stopping_criteria(ids, self.scores[pos]):
                    return
            extra = yield token
            tokens = [token] + [int(t) for t in (extra or [])]

    # ------------------------------------------------------------------ completions
    def _prompt_tokens(self, prompt: Union[str, List[int]], suffix: Optional[str]):
        """(tokens, prompt text, suffix text to append): llama-cpp-python tokenizes a str prompt
        with special=True and BOS as the model wants; a token list is taken as is."""
        tok = self._tok
        if isinstance(prompt, str):
            if suffix is not None:
                fim = self._fim_ids()
                if fim:
                    pre, suf, mid = fim
                    ids = ([tok.bos_id] if tok.add_bos else []) + [pre] + tok.encode(prompt, add_bos=False) \
                        + [suf] + tok.encode(suffix, add_bos=False) + [mid]
                    return ids, prompt, None
            ids = tok.encode(prompt, add_bos=True, special=True) if prompt else (
                [tok.bos_id] if tok.bos_id is not None else [])
            return ids, prompt, suffix
        ids = [int(t) for t in prompt]
        return ids, self.detokenize(ids).decode("utf-8", errors="ignore"), suffix

    def _fim_ids(self):
        for names in _FIM:
            ids = [self._tok.encode(n, add_bos=False, special=True) for n in names]
            if all(len(i) == 1 for i in ids) and all(self._tok.decode(i) == b"" for i in ids):
                return [i[0] for i in ids]
        return None

    def _top_logprobs(self, pos: int, token: int, k: int):
        """(logprob of token, {text: logprob} of the k likeliest tokens plus token) at position pos."""
        lp = _logprobs_of(self.scores[pos])
        text = lambda i: self.detokenize([int(i)]).decode("utf-8", errors="ignore")  # noqa: E731
        top: Dict[str, float] = {}
        if k > 0:
            k = min(k, lp.shape[0])
            best = np.argpartition(-lp, k - 1)[:k]
            for i in best[np.argsort(-lp[best], kind="stable")]:
                top[text(i)] = float(lp[i])
        top[text(token)] = float(lp[token])
        return float(lp[token]), top

    def _create_completion(self, prompt, suffix=None, max_tokens=16, temperature=0.8, top_p=0.95, min_p=0.05,
                           typical_p=1.0, logprobs=None, echo=False, stop=None, frequency_penalty=0.0,
                           presence_penalty=0.0, repeat_penalty=1.0, top_k=40, stream=False, seed=None,
                           tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                           stopping_criteria=None, logits_processor=None, grammar=None, logit_bias=None):
        """Checks everything up front (so a bad request raises at the call, streaming or not),
        then returns the iterator of chunk dicts (a single one when not streaming)."""
        self._check_open()
        self._unsupported(mirostat_mode, grammar)
        prompt_tokens, prompt_text, suffix_text = self._prompt_tokens(prompt, suffix)
        if not prompt_tokens:
            raise ValueError("empty prompt and the model has no BOS token to start from")
        if len(prompt_tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {self._n_ctx}")
        bad = [t for t in prompt_tokens if not 0 <= t < self._n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0..{self._n_vocab - 1})")
        room = self._n_ctx - len(prompt_tokens)
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)
        stop = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
        stops = [s.encode("utf-8") for s in stop if s]
        if logprobs is not None and int(logprobs) < 0:
            raise ValueError("logprobs must be a non-negative number of top tokens")
        if seed is not None:
            self.set_seed(seed)
        else:  # llama-cpp-python's seed chain: the next seed derives from the current one
            base = self._seed if self._seed != LLAMA_DEFAULT_SEED else random.getrandbits(32)
            self.set_seed(random.Random(base).randint(0, 2**32))
        params = self._params(top_k, top_p, min_p, typical_p, temperature, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias)
        if self.cache is not None:
            self._maybe_load_cached(prompt_tokens)
        request = dict(prompt_tokens=prompt_tokens, prompt_text=prompt_text, suffix_text=suffix_text,
                       max_tokens=max_tokens, stops=stops, logprobs=logprobs, echo=echo, stream=stream,
                       params=params, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                       model=model if model is not None else self.model_path)
        return self._completion_chunks(**request)

    def _maybe_load_cached(self, prompt_tokens):
        try:
            item = self.cache[prompt_tokens]
        except KeyError:
            return
        prefix = self.longest_token_prefix
        if prefix(item.input_ids[: item.n_tokens].tolist(), prompt_tokens) > prefix(self._engine.tokens, prompt_tokens):
            self.load_state(item)

    def _completion_chunks(self, prompt_tokens, prompt_text, suffix_text, max_tokens, stops, logprobs, echo,
                           stream, params, logits_processor, stopping_criteria, model) -> Iterator[dict]:
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        n_prompt = len(prompt_tokens)
        bos = self.token_bos()
        want_rows = logprobs is not None and echo

        def chunk(text, lp=None, finish=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        def lp_dict(positions_tokens, base_offset, prefix_bytes):
            """llama-cpp's CompletionLogprobs for (position, token) pairs; text offsets in characters."""
            out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            before = prefix_bytes
            for pos, t in positions_tokens:
                out["tokens"].append(self.detokenize([t]).decode("utf-8", errors="ignore"))
                out["text_offset"].append(base_offset + len(before.decode("utf-8", errors="ignore")))
                if pos <= 0:  # the first token of an echoed prompt has nothing before it
                    out["token_logprobs"].append(None)
                    out["top_logprobs"].append(None)
                else:
                    value, top = self._top_logprobs(pos - 1, t, int(logprobs))
                    out["token_logprobs"].append(value)
                    out["top_logprobs"].append(top)
                before += self._tok.token_bytes(t)
            return out

        t_start = time.perf_counter()
        before = self._engine.pager.stats.snapshot()
        completion: list[int] = []
        ends: list[int] = []            # byte end of each completion token in buf
        buf, emitted, reported = b"", 0, 0
        finish, t_first, finished = "length", None, False
        gen = self._generate(prompt_tokens, params, logits_processor, stopping_criteria, rows=want_rows)
        try:
            if stream and echo and prompt_text:
                yield chunk(prompt_text)
            for tok in gen:
                if t_first is None:
                    t_first = time.perf_counter() - t_start
                if tok in self._eog:
                    finish = "stop"
                    break
                completion.append(tok)
                start = max(0, len(buf) - max((len(s) for s in stops), default=1) + 1)
                buf += self._tok.token_bytes(tok)
                ends.append(len(buf))
                hits = [i for i in (buf.find(s, start) for s in stops) if i >= 0]
                if hits:
                    buf, finish = buf[: min(hits)], "stop"
                    break
                if stream:
                    safe = utf8_complete(buf, len(buf) - stop_holdback(buf, stops))
                    text = buf[emitted:safe].decode("utf-8", errors="ignore")
                    if not text:  # special tokens or stray bytes: nothing to show yet
                        emitted = max(emitted, safe)
                    elif safe > emitted:
                        lp = None
                        if logprobs is not None:
                            done = [i for i in range(reported, len(completion)) if ends[i] <= safe]
                            lp = lp_dict([(n_prompt + i, completion[i]) for i in done], len(prompt_text),
                                         buf[: ends[reported - 1]] if reported else b"")
                            reported += len(done)
                        yield chunk(text, lp)
                        emitted = safe
                if len(completion) >= max_tokens:
                    break
            else:
                finish = "stop"  # a stopping criterion ended the stream
            finished = True
        finally:  # also when a stream is abandoned (finish_reason None in the stats then)
            gen.close()
            self._generation_end(n_prompt, len(completion), finish if finished else None,
                                 time.perf_counter() - t_start, t_first, before)
        if self.cache is not None:
            self.cache[prompt_tokens + completion] = self.save_state()

        if stream:
            text = buf[emitted:].decode("utf-8", errors="ignore")
            if text or (logprobs is not None and reported < len(completion)):
                lp = None
                if logprobs is not None:
                    lp = lp_dict([(n_prompt + i, completion[i]) for i in range(reported, len(completion))],
                                 len(prompt_text), buf[: ends[reported - 1]] if reported else b"")
                yield chunk(text, lp)
            if suffix_text:
                yield chunk(suffix_text)
            yield chunk("", None, finish)
            return

        text = buf.decode("utf-8", errors="ignore")
        if echo:
            text = prompt_text + text
        if suffix_text:
            text += suffix_text  # no FIM tokens in this vocabulary: llama-cpp-python's fallback
        lp = None
        if logprobs is not None:
            if echo:
                first = 1 if prompt_tokens[0] == bos else 0
                pairs = [(p, prompt_tokens[p]) for p in range(first, n_prompt)]
                pairs = [(p if p > first else 0, t) for p, t in pairs]  # OpenAI: the first has no logprob
                pairs += [(n_prompt + i, t) for i, t in enumerate(completion)]
                lp = lp_dict(pairs, 0, b"")
            else:
                lp = lp_dict([(n_prompt + i, t) for i, t in enumerate(completion)], len(prompt_text), b"")
        out = chunk(text, lp, finish)
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(completion),
                        "total_tokens": n_prompt + len(completion)}
        yield out

    def _generation_end(self, n_prompt, n_completion, finish, seconds, t_first, before):
        stats = self._engine.pager.stats.delta(before)
        decode_s = max(seconds - (t_first or 0.0), 1e-9)
        stats.update(prompt_tokens=n_prompt, completion_tokens=n_completion, finish_reason=finish,
                     seconds=seconds, time_to_first_token=t_first,
                     tokens_per_second=(n_completion - 1) / decode_s if n_completion > 1 else 0.0,
                     model=self.model_path)
        self._hooks.on_generation_end(stats=stats)
        if self.verbose:
            print(f"flashmoe: {n_prompt} prompt + {n_completion} tokens in {seconds:.2f} s "
                  f"({stats['tokens_per_second']:.1f} tok/s) | experts: {stats['hits']} hits, {stats['misses']} misses, "
                  f"{stats['bytes_read'] / 2**20:.1f} MiB read", file=sys.stderr)

    def create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar=None,
        logit_bias: Optional[Dict[int, float]] = None,
    ):
        """A text completion as llama-cpp-python returns it: a `text_completion` dict, or with
        stream=True an iterator of chunks (delta text, finish_reason only on the last, no usage).
        max_tokens None or <= 0: until the context is full. logprobs works without logits_all
        (differs: llama-cpp-python requires logits_all=True)."""
        chunks = self._create_completion(
            prompt=prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
        if stream:
            return chunks
        return next(chunks)

    __call__ = create_completion  # llama-cpp-python's __call__ takes the same arguments

    def create_chat_completion(
        self,
        messages: List[Dict[str, Any]],
        functions: Optional[List[Dict[str, Any]]] = None,
        function_call=None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        seed: Optional[int] = None,
        response_format: Optional[Dict[str, Any]] = None,
        max_tokens: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar=None,
        logit_bias: Optional[Dict[int, float]] = None,
        logprobs: Optional[bool] = None,
        top_logprobs: Optional[int] = None,
    ):
        """A `chat.completion` dict (or `chat.completion.chunk` iterator) as llama-cpp-python
        returns it. The handler is chosen as llama-cpp-python does: `chat_handler`, else the
        store's own template ("chat_template.default"), else a llama_cpp named `chat_format`."""
        handler = self.chat_handler or self._chat_handlers.get(self.chat_format) or self._named_handler()
        return handler(
            llama=self, messages=messages, functions=functions, function_call=function_call, tools=tools,
            tool_choice=tool_choice, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, stop=stop,
            seed=seed, response_format=response_format, max_tokens=max_tokens, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)

    def _named_handler(self):
        if self.chat_format is None:
            raise ValueError(f"{self.model_path}: the store has no chat template; pass chat_format= (a "
                             "llama-cpp-python format name such as 'chatml') or chat_handler=")
        try:
            from llama_cpp import llama_chat_format
        except ImportError:
            raise ValueError(f"chat_format={self.chat_format!r} is a llama-cpp-python chat format; install "
                             "llama-cpp-python to use it, or use the store's own template (chat_format=None)") from None
        return llama_chat_format.get_chat_completion_handler(self.chat_format)

    # ------------------------------------------------------------------ misc
    def create_embedding(self, input, model=None):
        raise NotImplementedError("embeddings are not supported by flashmoe (it runs causal LMs)")

    def embed(self, input, *args, **kwargs):
        raise NotImplementedError("embeddings are not supported by flashmoe (it runs causal LMs)")

    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float32)
        m = np.amax(x, axis=axis, keepdims=True)
        m[~np.isfinite(m)] = 0
        z = x - m
        with np.errstate(divide="ignore"):
            return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))

    longest_token_prefix = staticmethod(common_prefix)

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this Llama was closed")

    def close(self) -> None:
        """Release the engine (expert pool, reader threads, open files). Idempotent."""
        if not getattr(self, "_closed", True):
            self._closed = True
            self._engine.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        return dict(model_path=self.model_path, seed=self._seed, n_ctx=self._n_ctx, n_batch=self.n_batch,
                    n_threads=self.n_threads, logits_all=self._logits_all, last_n_tokens_size=self.last_n_tokens_size,
                    chat_format=self.chat_format, chat_handler=self.chat_handler, verbose=self.verbose,
                    device=self.device, ram_budget=self.ram_budget, vram_budget=self.vram_budget,
                    cache_policy=self.cache_policy, prefetch=self.prefetch, backend=self.backend)

    def __setstate__(self, state):
        self.__init__(**state)


# ---------------------------------------------------------------------- chat handler
def _template_chat_handler(template: str, bos_token: str, eos_token: str):
    """A llama-cpp-python style chat handler over the store's jinja template (rendered by the
    core's sandboxed renderer): template -> tokens (special=True, no extra BOS) -> completion with
    the template's end token as stop -> chat dicts, as llama_chat_format's Jinja2ChatFormatter
    handler does. Tool calls are not parsed yet (tools are passed to the template only)."""

    def handler(*, llama: Llama, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0, stream=False, stop=[],
                seed=None, response_format=None, max_tokens=None, presence_penalty=0.0, frequency_penalty=0.0,
                repeat_penalty=1.0, tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                logits_processor=None, grammar=None, logit_bias=None, logprobs=None, top_logprobs=None, **kwargs):
        from flashmoe_plugin.runtime.chat import render

        if response_format is not None and response_format.get("type") not in (None, "text"):
            raise NotImplementedError("response_format json_object/json_schema needs grammar sampling, "
                                      "which flashmoe does not support yet")
        if functions is not None and tools is None:
            tools = [{"type": "function", "function": f} for f in functions]
        extra = {k: v for k, v in dict(tools=tools, tool_choice=tool_choice, functions=functions,
                                      function_call=function_call).items() if v is not None}
        prompt = render(template, list(messages), add_generation_prompt=True, bos_token=bos_token,
                        eos_token=eos_token, **extra, **kwargs)
        ids = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if eos_token:
            stop = stop + [eos_token]
        # differs: logprobs=True without top_logprobs still returns the chosen tokens' logprobs
        n_logprobs = (top_logprobs or 0) if logprobs else None
        completion = llama.create_completion(
            prompt=ids, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            logprobs=n_logprobs, stream=stream, stop=stop, seed=seed, max_tokens=max_tokens,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
        return _chat_chunks(completion) if stream else _chat_completion(completion)

    return handler


def _chat_logprobs(lp):
    if lp is None:
        return None
    return {"content": [{"token": token, "bytes": None, "logprob": value,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in (top or {}).items()]}
                        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])],
            "refusal": None}


def _chat_completion(c: dict) -> dict:
    choice = c["choices"][0]
    return {"id": "chat" + c["id"], "object": "chat.completion", "created": c["created"], "model": c["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                         "logprobs": _chat_logprobs(choice["logprobs"]), "finish_reason": choice["finish_reason"]}],
            "usage": c["usage"]}


def _chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    for i, c in enumerate(chunks):
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        choice = c["choices"][0]
        yield {**head, "choices": [{"index": 0,
                                    "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                                    "logprobs": _chat_logprobs(choice["logprobs"]),
                                    "finish_reason": choice["finish_reason"]}]}
