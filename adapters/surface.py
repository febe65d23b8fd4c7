"""The parts of llama-cpp-python's `Llama` that third-party code touches besides generation:
the tokenizer object, `create_chat_completion_openai_v1`, `from_pretrained` (local models
only: flashmoe runs offline) and embeddings. A mixin of `adapters.llama_cpp.Llama`, which
provides `tokenize`, `detokenize`, `create_chat_completion`, `reset`, `n_batch`, `_engine`.
"""
from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any, List, Optional, Union

from .tokenizer import FlashMoETokenizer


class DropInSurface:
    # ------------------------------------------------------------------ tokenizer
    def tokenizer(self) -> FlashMoETokenizer:
        """llama-cpp-python's tokenizer object for this model (with `hf_tokenizer`)."""
        return self.tokenizer_

    @property
    def tokenizer_(self) -> FlashMoETokenizer:
        tok = self.__dict__.get("_tokenizer_obj")
        if tok is None:
            tok = self.__dict__["_tokenizer_obj"] = FlashMoETokenizer(self)
        return tok

    # ------------------------------------------------------------------ openai types
    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any):
        """create_chat_completion as the openai package's pydantic types (ChatCompletion, or an
        iterator of ChatCompletionChunk with stream=True)."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("To use create_chat_completion_openai_v1, you must install the openai package."
                              "You can install it with `pip install openai`.") from None
        stream = kwargs.get("stream", False)
        assert isinstance(stream, bool)
        if stream:
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str] = None, additional_files=None,
                        local_dir=None, local_dir_use_symlinks="auto", cache_dir=None, **kwargs: Any):
        """A Llama from a local model: `repo_id` is a store folder, a .gguf file, or a folder in
        which `filename` (a glob, as llama-cpp-python's) picks one file or store folder. differs: nothing is
        downloaded (flashmoe runs offline); a Hub id that is no local path is an error saying so."""
        base = Path(os.path.expanduser(str(repo_id)))
        if not base.exists() and local_dir is not None:
            base = Path(local_dir)
        if not base.exists():
            raise ValueError(f"{repo_id}: not a local path; flashmoe's from_pretrained opens local store folders "
                             "and model files only (download the model first, e.g. `huggingface-cli download`)")
        path = base
        if base.is_dir() and filename is not None and not (base / "manifest.json").is_file():
            models = (p for p in base.rglob("*") if p.is_file() or (p / "manifest.json").is_file())  # files, stores
            found = sorted(p for p in models if fnmatch.fnmatch(str(p.relative_to(base)), filename)
                           or fnmatch.fnmatch(p.name, filename))
            if not found:
                raise ValueError(f"No file found in {base} that match {filename}")
            if len(found) > 1:
                raise ValueError(f"Multiple files found in {base} matching {filename}: {[str(p) for p in found]}")
            path = found[0]
        elif base.is_file() and filename is not None and not fnmatch.fnmatch(base.name, filename):
            raise ValueError(f"{base} does not match {filename}")
        return cls(model_path=str(path), **kwargs)

    # ------------------------------------------------------------------ embeddings
    def embed(self, input: Union[str, List[str]], normalize: bool = False, truncate: bool = True,
              return_count: bool = False):
        """Mean-pooled final hidden states (after the output norm, as llama.cpp's embeddings with
        pooling "mean"), one vector of n_embd floats per input; L2-normalised with normalize=True.
        Each text is tokenized as llama-cpp-python does (BOS as the model wants), cut to n_batch
        tokens with truncate, and run from an empty context; the context is reset afterwards.
        differs: no `embedding=True` needed at construction."""
        self._check_open()
        inputs = [input] if isinstance(input, str) else list(input)
        data, total = [], 0
        try:
            for text in inputs:
                tokens = self.tokenize(text.encode("utf-8"))
                if truncate:
                    tokens = tokens[: self.n_batch]
                if len(tokens) > self.n_batch:
                    raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {self.n_batch}")
                if not tokens:
                    raise ValueError("cannot embed an empty text (the model has no BOS token to stand for it)")
                total += len(tokens)
                self.reset()
                h = self._engine.forward(tokens, hidden=True).mean(dim=0)
                v = [float(x) for x in h.tolist()]
                if normalize:
                    n = math.sqrt(sum(x * x for x in v))
                    v = [x / n for x in v] if n > 0 else v
                data.append(v)
        finally:
            self.reset()
        out = data[0] if isinstance(input, str) else data
        return (out, total) if return_count else out

    def create_embedding(self, input: Union[str, List[str]], model: Optional[str] = None):
        """llama-cpp-python's CreateEmbeddingResponse: {"object": "list", "data": [{"object":
        "embedding", "embedding": [...], "index": i}], "model", "usage"}."""
        embeds, total = self.embed(input if isinstance(input, list) else [input], return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}
