"""A GGUF vocabulary (tokenizer.ggml.*) as a `tokenizers` tokenizer that splits text the way
llama.cpp does (src/llama-vocab.cpp), written as tokenizer.json + tokenizer_config.json into a
folder so that runtime.tokenizer.Tokenizer reads it like any other.

- SPM (`tokenizer.ggml.model == "llama"`): spaces become U+2581, one is prepended to the text
  (add_space_prefix), then the highest-scoring adjacent pair is merged until none is in the
  vocabulary; unknown bytes fall back to <0xXX>. Expressed as a BPE whose merge ranks follow the
  merged pieces' scores, with byte fallback.
- BPE (`"gpt2"`): llama.cpp's pre-tokenizer regexes for `tokenizer.ggml.pre`, applied in order
  (each splits the pieces of the previous one), then byte-level BPE over the file's merges.
Control/unknown tokens (types 2, 3) are special (matched in text only with special=True);
user-defined ones (type 4) are always matched, as llama.cpp does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_LLAMA3 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
           "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
          "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_DEFAULT = ["[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (regexes, ignore_merges), from llama-vocab.cpp
PRE_TOKENIZERS = {
    **{k: ([_LLAMA3], True) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{k: ([_QWEN2], False) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
    **{k: ([_GPT2], False) for k in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    "default": (_DEFAULT, False),
}


class VocabError(ValueError):
    pass


def _added(tokens, types):
    from tokenizers import AddedToken
    return [AddedToken(t, special=ty in (2, 3), normalized=False) for t, ty in zip(tokens, types) if ty in (2, 3, 4)]


def build(meta: dict, where: str = "GGUF"):
    """A tokenizers.Tokenizer for the tokenizer.ggml.* keys of meta."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise VocabError(f"{where}: no vocabulary (metadata 'tokenizer.ggml.model' / 'tokenizer.ggml.tokens' missing)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise VocabError(f"{where}: SentencePiece vocabulary without 'tokenizer.ggml.scores'")
        merges = []
        for i, t in enumerate(tokens):
            if types[i] != 1:  # normal pieces only (bytes are the fallback, controls are matched whole)
                continue
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                if a in vocab and b in vocab:
                    merges.append((-scores[i], i, vocab[a], (a, b)))
        merges = [m[3] for m in sorted(merges)]
        unk = next((tokens[i] for i, ty in enumerate(types) if ty == 2), None)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            norm.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norm)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise VocabError(f"{where}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        regexes, ignore = PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        raise VocabError(f"{where}: tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                         f"supported: llama (SentencePiece), gpt2 (BPE)")
    tok.add_tokens(_added(tokens, types))
    return tok


def write_folder(meta: dict, folder: Path, where: str = "GGUF") -> Path:
    """tokenizer.json and tokenizer_config.json (bos/eos, add_bos, chat template) into folder."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder
    tok = build(meta, where)
    tokens = meta["tokenizer.ggml.tokens"]
    kind = meta.get("tokenizer.ggml.model")

    def name(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))}
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tokenizer.{os.getpid()}.json"
    tok.save(str(tmp))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    os.replace(tmp, folder / "tokenizer.json")
    return folder
