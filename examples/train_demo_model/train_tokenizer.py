#!/usr/bin/env python3
"""Train the demo model's byte-level BPE tokenizer on the training split only.

    python examples/train_demo_model/train_tokenizer.py [--corpus .device/corpus/train.txt]
        [--out examples/train_demo_model/tokenizer] [--vocab 8192]

Writes tokenizer.json, tokenizer_config.json (ChatML chat template) and special_tokens_map.json,
loadable with transformers.PreTrainedTokenizerFast / AutoTokenizer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def iter_docs(path: Path):
    text = path.read_text(encoding="utf-8")
    for d in text.split("\n<|endoftext|>\n"):
        if d.strip():
            yield d


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=".device/corpus/train.txt")
    ap.add_argument("--out", default="examples/train_demo_model/tokenizer")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--encode", default=".device/data",
                    help="also encode train.txt/heldout.txt beside --corpus into DIR/{train,heldout}.u16.xz "
                         "and copy the tokenizer to DIR/tokenizer ('' to skip)")
    ap.add_argument("--skip-train", action="store_true", help="reuse the tokenizer in --out")
    args = ap.parse_args(argv)
    if not args.skip_train:
        train(args)
    if args.encode:
        encode(args)


def encode(args):
    import lzma
    import shutil

    import numpy as np

    tok = Tokenizer.from_file(str(Path(args.out) / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    dst = Path(args.encode)
    dst.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split in ("train", "heldout"):
        text = (Path(args.corpus).parent / f"{split}.txt").read_text(encoding="utf-8")
        docs = [d for d in text.split("\n<|endoftext|>\n") if d.strip()]
        ids = []
        for k in range(0, len(docs), 2048):
            for enc in tok.encode_batch(docs[k:k + 2048], add_special_tokens=False):
                ids.extend(enc.ids)
                ids.append(eot)
        arr = np.asarray(ids, dtype=np.uint16)
        (dst / f"{split}.u16.xz").write_bytes(lzma.compress(arr.tobytes(), preset=6))
        stats[split] = {"docs": len(docs), "tokens": int(arr.size), "bytes": len(text.encode()),
                        "bytes_per_token": len(text.encode()) / arr.size}
        print(split, stats[split])
    if (dst / "tokenizer").exists():
        shutil.rmtree(dst / "tokenizer")
    shutil.copytree(args.out, dst / "tokenizer")
    (dst / "token_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def train(args):

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_docs(Path(args.corpus)), trainer=trainer)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 2048,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, indent=2) + "\n")
    print("vocab", tok.get_vocab_size(), {s: tok.token_to_id(s) for s in SPECIALS})


if __name__ == "__main__":
    main()
