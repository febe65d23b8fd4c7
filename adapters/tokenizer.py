"""`Llama.tokenizer()` / `Llama.tokenizer_`: llama-cpp-python's tokenizer object
(`llama_cpp.llama_tokenizer.BaseLlamaTokenizer`: tokenize/detokenize/encode/decode), plus
`hf_tokenizer` as its `LlamaHFTokenizer` has, so code that reads the vocabulary through
transformers (outlines' `from_llamacpp`, for one) wraps a flashmoe Llama unchanged.
"""
from __future__ import annotations

from typing import List, Optional


class FlashMoETokenizer:
    def __init__(self, llama):
        self._llama = llama
        self._hf = None

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> List[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None, special: bool = False) -> bytes:
        return self._llama.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> List[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: List[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @property
    def hf_tokenizer(self):
        """The model's tokenizer as a transformers `PreTrainedTokenizerFast` (built on first use
        from the same tokenizer.json; needs transformers installed)."""
        if self._hf is None:
            tok = self._llama._tok
            backend = getattr(tok, "tok", None)
            if backend is None:
                raise AttributeError(f"{self._llama.model_path}: this model's vocabulary is not a HF tokenizers "
                                     "tokenizer, so there is no hf_tokenizer")
            try:
                from transformers import PreTrainedTokenizerFast
            except ImportError:
                raise AttributeError("hf_tokenizer needs transformers (pip install transformers)") from None
            names = {k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token)) if v}
            self._hf = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
            if tok.chat_template:
                self._hf.chat_template = tok.chat_template
        return self._hf
