"""Constrained decoding: a grammar turns into a mask over the vocabulary at every step.

A `Grammar` is a description (llama.cpp GBNF, JSON schema, regex or Lark); a `Constraint` is one
generation's live matcher over it. The sampler calls `constraint.mask(logits)` before it draws
and `constraint.accept(token)` after, so every adapter (Llama, server, LangChain, shell) gets the
same behaviour. The matching is llguidance's (a maintained Rust library, also behind llama.cpp's
`%llguidance` grammars): it computes a token mask without walking the vocabulary token by token
(a token trie plus a lexer over bytes), measured at tens of microseconds per token on a
150k-token vocabulary (benchmarks/constraints_mask.py), far below one decode step.

    g = Grammar.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    c = Constraint(g, tokenizer)          # tokenizer: runtime.tokenizer.Tokenizer (or anything
    logits = c.mask(logits); c.accept(t)  # with token_bytes/encode/special_ids/eos_id)
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import numpy as np
import torch


# A schema's own "x-guidance" options still win over these. Free whitespace lets a weak model pad
# JSON with newlines until max_tokens runs out.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that does not compile, or a token the grammar forbids."""


@dataclass(frozen=True)
class Grammar:
    kind: str   # "gbnf" | "json_schema" | "regex" | "lark"
    text: str

    @classmethod
    def gbnf(cls, text: str) -> "Grammar":
        """llama.cpp's GBNF (grammars/*.gbnf, `LlamaGrammar`); Lark text is accepted too."""
        return cls("gbnf", text)

    @classmethod
    def json_schema(cls, schema: dict | str | None = None) -> "Grammar":
        """A JSON value matching `schema`; None means any JSON object (response_format json_object)."""
        if schema is None:
            schema = {"type": "object"}
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        """llguidance's Lark dialect (supports `%json {schema}` inside rules)."""
        return cls("lark", text)

    def compiled(self) -> str:
        import llguidance
        try:
            if self.kind == "json_schema":  # compact separators and no free whitespace, as json.dumps
                return llguidance.LLMatcher.grammar_from_json_schema(self.text, defaults=JSON_STYLE)
            return llguidance.grammar_from(self.kind, self.text)
        except Exception as e:  # llguidance reports syntax errors as ValueError/RuntimeError
            raise GrammarError(f"{self.kind} grammar does not compile: {e}") from e


_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, n_vocab: int, eos: int | None = None):
    """llguidance's view of our vocabulary (built once per tokenizer, size and EOS: ~2 s at 150k).
    eos: the token that ends a match (default the tokenizer's EOS)."""
    cache = _LL_TOKENIZERS.setdefault(tokenizer, {})
    eos = tokenizer.eos_id if eos is None else eos
    if eos is None:
        raise GrammarError("the model has no end-of-sequence token, so a grammar could never let it stop")
    key = (n_vocab, eos)
    if key not in cache:
        import llguidance

        special = set(getattr(tokenizer, "special_ids", ()))
        tokens = []
        for i in range(n_vocab):
            if i in special:  # only reachable through <|name|> syntax in a grammar, never by text
                name = tokenizer.token_bytes(i, special=True)
                tokens.append(b"\xff" + name if name else b"")
            else:
                tokens.append(tokenizer.token_bytes(i))

        encode = weakref.WeakMethod(tokenizer.encode)  # the cache must not keep the tokenizer alive

        class _Vocab:  # what llguidance.TokenizerWrapper reads
            eos_token_id = eos
            bos_token_id = tokenizer.bos_id
            special_token_ids = sorted(special)

            def __call__(self, text):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                return encode()(text, add_bos=False)

        vocab = _Vocab()
        vocab.tokens = tokens
        cache[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=n_vocab)
    return cache[key]


class Constraint:
    """One generation's position inside a grammar."""

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: int, end_ids=()):
        import llguidance

        self.grammar = grammar
        self.n_vocab = int(n_vocab)
        ends = sorted(int(i) for i in end_ids if 0 <= int(i) < self.n_vocab)
        ll = _ll_tokenizer(tokenizer, self.n_vocab, None if tokenizer.eos_id is not None or not ends else ends[0])
        self.matcher = llguidance.LLMatcher(ll, grammar.compiled(), log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"{grammar.kind} grammar rejected: {self.matcher.get_error()}")
        # The model's other end-of-generation tokens (e.g. <|im_end|>) end the text just as EOS does.
        self.eos = ll.eos_token
        self.end_ids = sorted({int(i) for i in end_ids if 0 <= int(i) < self.n_vocab} - {self.eos})
        self._bits = np.zeros(((self.n_vocab + 31) // 32,), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary: the tokens the grammar allows next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"grammar matcher failed: {self.matcher.get_error()}")
        ok = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)
        if self.end_ids and ok[self.eos]:
            ok[self.end_ids] = True
        return ok

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of forbidden tokens to -inf (in place on a CPU float32 row; returns it).
        numpy, not torch: a single-threaded pass over the row, ~50 us at 150k tokens, where torch's
        threaded masked_fill measured up to 60 ms on a loaded 2-core machine."""
        ok = self.allowed()
        row = logits.numpy()
        n = min(row.shape[-1], ok.shape[0])
        np.copyto(row[..., :n], -np.inf, where=~ok[:n])
        row[..., n:] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        token = int(token)
        if token in self.end_ids:
            token = self.eos
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} is not allowed by the grammar here: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the grammar allows no alternative to from here (not yet accepted)."""
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed now)."""
        return self.matcher.is_accepting()


def as_grammar(grammar) -> Grammar | None:
    """Accept our Grammar, a llama_cpp.LlamaGrammar (its GBNF text) or a GBNF string."""
    if grammar is None or isinstance(grammar, Grammar):
        return grammar
    if isinstance(grammar, str):
        return Grammar.gbnf(grammar)
    text = getattr(grammar, "_grammar", None)
    if isinstance(text, str):
        return Grammar.gbnf(text)
    raise TypeError(f"grammar must be a GBNF string, a llama_cpp.LlamaGrammar or a flashmoe Grammar, "
                    f"not {type(grammar).__name__}")
