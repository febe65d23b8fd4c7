"""`Llama`: a drop-in for `llama_cpp.Llama` (llama-cpp-python 0.3.x) over a flashmoe expert store.

    from flashmoe_plugin import Llama
    llm = Llama(model_path="./store", n_ctx=2048, ram_budget="2G", verbose=False)
    llm("Once upon a time", max_tokens=64)                     # same dict shapes as llama-cpp-python
    for chunk in llm.create_chat_completion(messages, stream=True): ...
    llm.eval(llm.tokenize(b"Hello")); llm.scores[llm.n_tokens - 1]

The class is split by concept: this file (construction, model facts, tokens, state, the public
create_* calls), generation.py (sampling, generate, the token loop), completion.py (completion
chunks), chat.py (the template chat handler, tools, response_format), surface.py (tokenizer
object, openai types, from_pretrained, embeddings).

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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from flashmoe_plugin.runtime.generate import common_prefix

from .chat import template_chat_handler
from .completion import Completions
from .generation import LLAMA_DEFAULT_SEED, Generation
from .surface import DropInSurface


# llama.cpp's names for our architectures (GGUF `general.architecture`), so `metadata` reads the same.
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}

# Special tokens llama.cpp treats as end-of-generation (llama-vocab.cpp) besides EOS itself.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>", "<|end_of_text|>")

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


class Llama(Completions, Generation, DropInSurface):
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
                  "storage_options", "experts_per_token", "decode_graph", "n_cpu_moe", "dense_quant"):
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
            self._chat_handlers["chat_template.default"] = template_chat_handler(
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
        cache = self._engine.kv.save(n)  # K/V of the cached positions (+ recurrent states)
        size = sum(t.numel() * t.element_size() for t in cache.values()) + n * self._n_vocab * 4
        return LlamaState(input_ids=self.input_ids.copy(), scores=self.scores[:n, :].copy(), n_tokens=n,
                          llama_state={**cache, "row_ok": self._row_ok[:n].copy()},
                          llama_state_size=size, seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        n = int(state.n_tokens)
        if n > self._n_ctx:
            raise ValueError(f"state holds {n} tokens; this context window holds {self._n_ctx}")
        self._engine.kv.load({k: v for k, v in state.llama_state.items() if k != "row_ok"}, n)
        self.input_ids = state.input_ids.copy()
        self.scores[:n, :] = state.scores
        self._row_ok[:] = False
        self._row_ok[:n] = state.llama_state.get("row_ok", True)
        self._engine.tokens = [int(t) for t in state.input_ids[:n]]
        self._seed = state.seed

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
