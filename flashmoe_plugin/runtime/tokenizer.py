"""The model's tokenizer (tokenizer.json through the `tokenizers` library) with llama.cpp's
conventions: BOS only where the model wants one, text as bytes, per-token bytes for streaming."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100...
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_str(value):
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer_json: Path, tokenizer_config: dict, chat_template: str | None,
                 bos_id: int | None, eos_id: int | None):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(tokenizer_json))
        spec = json.loads(Path(tokenizer_json).read_text())
        decoder = json.dumps(spec.get("decoder") or {})
        self.byte_level = "ByteLevel" in decoder
        self.special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(tokenizer_config.get("add_bos_token", False)) and bos_id is not None
        self.chat_template = chat_template
        self.bos_token = self.tok.id_to_token(bos_id) if bos_id is not None else ""
        self.eos_token = self.tok.id_to_token(eos_id) if eos_id is not None else ""
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, folder, model_config=None) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the store has no tokenizer")
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template", template)
        from tokenizers import Tokenizer as HFTokenizer
        t = HFTokenizer.from_file(str(path))

        def tid(name, fallback):
            s = _token_str(cfg.get(name))
            i = t.token_to_id(s) if s else None
            if i is None:
                i = fallback[0] if isinstance(fallback, list) and fallback else fallback
            return i

        mc = model_config
        bos = tid("bos_token", getattr(mc, "bos_token_id", None))
        eos = tid("eos_token", getattr(mc, "eos_token_id", None))
        return cls(path, cfg, template, bos, eos)

    def encode(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.tok.encode_special_tokens = not special  # special=False: "<|im_end|>" in text is plain text
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The exact bytes one token stands for (may be part of a UTF-8 character)."""
        key = (token << 1) | special
        b = self._bytes.get(key)
        if b is None:
            piece = self.tok.id_to_token(token)
            if piece is None:
                b = b""
            elif token in self.special_ids:
                b = piece.encode() if special else b""
            elif self.byte_level:
                dec = _byte_decoder()
                b = bytes(dec[c] for c in piece) if all(c in dec for c in piece) else piece.encode()
            elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                b = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
            else:
                b = piece.replace("\u2581", " ").encode()
            self._bytes[key] = b
        return b

    def decode(self, tokens, special: bool = False) -> bytes:
        return b"".join(self.token_bytes(t, special) for t in tokens)
