#!/usr/bin/env python3
"""Build the demo model's English corpus from Debian packages (offline-reproducible recipe).

    python examples/train_demo_model/make_corpus.py [--out .device/corpus] [--work /tmp/flashmoe-corpus]

Steps: `apt-get download` each package in PACKAGES (run `apt-get update` first; no root needed for
download), unpack with `dpkg -x`, extract prose from each source with a source-specific cleaner
(reStructuredText, POD, dictd, fortune, HTML, plain text), filter paragraphs that look like code,
tables or non-English text, deduplicate paragraphs across the whole corpus, group them into
documents, and split documents deterministically into train / held-out (each source contributes
HELDOUT_FRACTION of its bytes to held-out, chosen by a hash of the document id).

Outputs in --out:
  train.txt, heldout.txt   documents separated by a line "<|endoftext|>"
  train.txt.xz             compressed copy that is carried to the GPU machine
  manifest.json            packages (name, version, sha256 of the .deb, licence), per-source byte
                           and document counts, cleaning parameters
Everything is deterministic given the same package versions (recorded in the manifest).
"""
from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import html
import html.parser
import json
import lzma
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

EOT = "<|endoftext|>"
HELDOUT_FRACTION = 0.006
DOC_TARGET_BYTES = 6000          # small entries (dictionary, fortunes) are grouped to about this size

# package -> licence (from the package's debian/copyright; copies go with the model card)
PACKAGES = {
    "python3.11-doc": "PSF-2.0 (Python Software Foundation License); docs also BSD-0 for examples",
    "linux-doc-6.1": "GPL-2.0 (Linux kernel documentation)",
    "perl-doc": "Artistic-1.0 or GPL-1.0+ (Perl)",
    "dict-gcide": "GPL-3.0+ (GNU Collaborative International Dictionary of English; "
                  "Webster 1913 is public domain)",
    "fortunes": "BSD-4-Clause-UC and various; see copyright",
    "fortunes-min": "BSD-4-Clause-UC and various; see copyright",
    "jargon-text": "public domain (The Jargon File 4.4.7)",
    "gnu-standards": "GFDL-1.3+ (GNU Coding Standards, Information for Maintainers of GNU Software)",
    "debian-reference-en": "GPL-2.0+ (Debian Reference)",
    "debian-handbook": "GPL-2.0+ or CC-BY-SA-3.0 (The Debian Administrator's Handbook)",
    "debian-history": "GPL-2.0+ (A Brief History of Debian)",
    "python-django-doc": "BSD-3-Clause (Django documentation)",
    "postgresql-doc-15": "PostgreSQL License (BSD-like)",
    "gimp-help-en": "GFDL-1.2+, no invariant sections (GIMP User Manual; copyright file in gimp-help-common)",
}


# packages whose copyright file lives in another package (a symlinked doc folder)
COPYRIGHT_FROM = {"gimp-help-en": "gimp-help-common"}


# ----------------------------------------------------------------------------- packages

def _download(pkg: str, debs: Path) -> Path:
    have = sorted(debs.glob(f"{pkg}_*.deb"))
    if not have:
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, stdout=subprocess.DEVNULL)
        have = sorted(debs.glob(f"{pkg}_*.deb"))
    return have[-1]


def copy_licences(work: Path, out: Path):
    """Copy each package's debian/copyright to out/licenses/PKG.copyright."""
    dst = out / "licenses"
    dst.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        src_pkg = COPYRIGHT_FROM.get(pkg, pkg)
        f = work / "x" / pkg / "usr/share/doc" / src_pkg / "copyright"
        if not f.is_file():
            deb = _download(src_pkg, work / "debs")
            tmp = work / "x" / f"_licence_{src_pkg}"
            tmp.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
            f = tmp / "usr/share/doc" / src_pkg / "copyright"
        (dst / f"{pkg}.copyright").write_bytes(f.read_bytes())

def fetch(work: Path) -> dict:
    debs, info = work / "debs", {}
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        deb = _download(pkg, debs)
        dest = work / "x" / pkg
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(dest)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        info[pkg] = {"version": version, "deb": deb.name,
                     "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                     "licence": PACKAGES[pkg]}
    return info


def read_text(p: Path) -> str:
    data = p.read_bytes()
    if p.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- paragraph filter

_WS = re.compile(r"[ \t\r\f\v]+")
_CODEY = set("{}[];=<>$@\\|#_/")


def norm_space(s: str) -> str:
    return _WS.sub(" ", s).strip()


def good_paragraph(p: str) -> bool:
    """Keep English prose; drop code, tables, ASCII art, non-Latin text and fragments."""
    n = len(p)
    if n < 3 or len(p.split()) < 2 and not p.endswith(":"):
        return False
    if any(0x2500 <= ord(c) <= 0x259F for c in p):           # box drawing
        return False
    nonascii = sum(1 for c in p if ord(c) > 127)
    if nonascii > 0.03 * n + 1:
        return False
    letters = sum(1 for c in p if c.isalpha() or c == " ")
    if letters < 0.78 * n:
        return False
    if sum(1 for c in p if c in _CODEY) > 0.04 * n + 1:
        return False
    if "+--" in p or "--+" in p or "|--" in p:
        return False
    words = re.findall(r"[A-Za-z]+", p)
    if not words:
        return False
    # mostly short lowercase tokens with few vowels looks like identifiers/commands
    vowelless = sum(1 for w in words if len(w) > 3 and not re.search(r"[aeiouyAEIOUY]", w))
    return vowelless <= 0.2 * len(words) + 1


def paragraphs_from_lines(lines, keep_lines=False):
    """Group lines into paragraphs at blank lines; unwrap each (or keep line breaks)."""
    out, cur = [], []

    def flush():
        if cur:
            if keep_lines:
                out.append("\n".join(norm_space(l) for l in cur))
            else:
                out.append(norm_space(" ".join(cur)))
            cur.clear()

    for line in lines:
        if not line.strip():
            flush()
            continue
        s = line.strip()
        if not keep_lines and re.match(r"^([-*+•]|\d+[.)]|#\.)\s+\S", s) and cur:
            flush()                                           # a list item starts a new line
        cur.append(s)
    flush()
    return out


# ----------------------------------------------------------------------------- reStructuredText

_RST_UNDERLINE = re.compile(r"^\s*([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_RST_TABLE = re.compile(r"^\s*(\+[-=+]+\+|[=\s]{5,}=)\s*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_RST_KEEP_BODY = {
    "note", "warning", "versionadded", "versionchanged", "deprecated", "seealso", "tip",
    "important", "attention", "caution", "hint", "admonition", "impl-detail", "topic", "sidebar",
    "rubric", "function", "method", "class", "attribute", "data", "exception", "module",
    "classmethod", "staticmethod", "decorator", "describe", "option", "envvar", "opcode",
    "c:function", "c:macro", "c:type", "c:member", "c:var", "cmdoption", "glossary",
    "abstractmethod", "coroutinefunction", "coroutinemethod", "availability", "only",
}


def _rst_inline(s: str) -> str:
    s = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)\s*<[^`>]*>`", r"\1", s)   # :role:`text <target>`
    s = re.sub(r":[\w:+-]+:`~([^`]*?)`", lambda m: m.group(1).split(".")[-1], s)
    s = re.sub(r":[\w:+-]+:`!?([^`]*?)`", r"\1", s)
    s = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", s)                 # `text <url>`_
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`]+)`_{0,2}", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\|[\w -]+\|_?", "", s)
    s = re.sub(r"\[#?\w*\]_", "", s)
    s = re.sub(r"(\w)_\b", r"\1", s)
    return s


def clean_rst(text: str):
    lines = text.splitlines()
    kept, skip_indent, i = [], None, 0
    prev_literal = False
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if prev_literal and line.strip():
            # first non-blank line after a '::' paragraph: literal block if more indented
            prev_literal = False
            if indent > literal_base:
                skip_indent = literal_base
                continue
        if not line.strip():
            kept.append("")
            continue
        if _RST_UNDERLINE.match(line) or _RST_TABLE.match(line):
            kept.append("")
            continue
        if line.lstrip().startswith("|") or line.lstrip().startswith("+-"):
            continue
        m = _RST_DIRECTIVE.match(line)
        if m:
            name = m.group(2).split(":")[-1] if m.group(2).startswith("py:") else m.group(2)
            if name in _RST_KEEP_BODY:
                arg = m.group(3).strip()
                if name in ("note", "warning", "tip", "important", "attention", "caution",
                            "hint", "seealso", "deprecated", "versionadded", "versionchanged"):
                    # the argument of these is prose ("versionadded:: 3.2" is not)
                    if arg and not re.match(r"^[\d.]+$", arg):
                        kept.append("")
                        kept.append(" " * indent + arg)
                # skip the option lines (":noindex:", ...) right after the directive
                while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):
                    i += 1
                kept.append("")
                continue
            skip_indent = indent
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):                  # comment, target, footnote
            skip_indent = indent
            continue
        if line.rstrip().endswith("::"):
            literal_base = indent
            prev_literal = True
            s = line.rstrip()[:-2].rstrip()
            if not s:
                continue
            line = s + ":" if not s.endswith(":") else s
        kept.append(line)
    out = []
    for p in paragraphs_from_lines(kept):
        p = _rst_inline(p)
        p = norm_space(p)
        if p:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- POD

def _pod_inline(s: str) -> str:
    for _ in range(4):
        s2 = re.sub(r"([A-Z])<<+\s+(.*?)\s+>>+", lambda m: f"{m.group(1)}<{m.group(2)}>", s)
        s2 = re.sub(r"E<lt>", "<", s2)
        s2 = re.sub(r"E<gt>", ">", s2)
        s2 = re.sub(r"E<[^<>]*>", "", s2)
        s2 = re.sub(r"[XZ]<[^<>]*>", "", s2)
        s2 = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", s2)
        s2 = re.sub(r'L<"?([^<>"]*)"?>', lambda m: m.group(1).split("/")[-1].strip('"'), s2)
        s2 = re.sub(r"[BCIFS]<([^<>]*)>", r"\1", s2)
        if s2 == s:
            break
        s = s2
    return s


def clean_pod(text: str):
    out, in_begin = [], False
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        if para.startswith("=begin"):
            in_begin = True
            continue
        if para.startswith("=end"):
            in_begin = False
            continue
        if in_begin or para[0] in " \t":                      # verbatim (code) paragraph
            continue
        if para.startswith("="):
            m = re.match(r"=(head\d|item)\s+(.*)", para, re.S)
            if not m:
                continue
            body = m.group(2).strip()
            if m.group(1) == "item" and re.fullmatch(r"[*\d.]+", body):
                continue
            para = body
        out.append(norm_space(_pod_inline(para)))
    return out


# ----------------------------------------------------------------------------- dictd (gcide)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64num(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def clean_gcide_entry(entry: str):
    text = entry
    for _ in range(4):                                        # nested [..]: etymology, tags, [=a]
        t = re.sub(r"\[[^\[\]]*\]", "", text)
        if t == text:
            break
        text = t
    text = re.sub(r"\\[^\\\n]*\\,?", "", text)               # pronunciation \Af*fect"\
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"\s--([A-Z][\w. ]*?)\.?$", r" (\1)", text, flags=re.M)   # quote attribution
    paras = []
    for p in paragraphs_from_lines(text.splitlines()):
        p = re.sub(r"\s+([,.;:])", r"\1", p)
        p = re.sub(r",\s*,", ",", p).strip(" ,")
        if p:
            paras.append(p)
    return paras


def gcide_entries(root: Path):
    d = root / "usr/share/dictd"
    raw = gzip.decompress((d / "gcide.dict.dz").read_bytes())
    seen, spans = set(), []
    for line in (d / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        span = (_b64num(parts[1]), _b64num(parts[2]))
        if span not in seen:
            seen.add(span)
            spans.append(span)
    spans.sort()
    for off, ln in spans:
        yield raw[off:off + ln].decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- HTML

class _HTMLText(html.parser.HTMLParser):
    BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "div",
             "blockquote", "br", "tr", "title", "table", "ul", "ol", "dl", "section"}
    SKIP_TAGS = {"pre", "script", "style", "head", "nav", "footer", "header"}
    SKIP_CLASSES = ("navheader", "navfooter", "sphinxsidebar", "related", "footer", "breadcrumbs",
                    "highlight", "toc", "navigation")
    VOID = {"br", "img", "meta", "link", "input", "hr", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras, self.cur, self.stack = [], [], []     # stack of (tag, skips)

    @property
    def skipping(self):
        return any(sk for _, sk in self.stack)

    def _flush(self):
        s = " ".join("".join(self.cur).replace("\u00b6", "").split())
        if s and not self.skipping:
            self.paras.append(s)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK:
            self._flush()
        if tag in self.VOID:
            return
        cls = dict(attrs).get("class", "") or ""
        skips = tag in self.SKIP_TAGS or any(c in cls.split() for c in self.SKIP_CLASSES)
        self.stack.append((tag, skips))

    def handle_endtag(self, tag):
        if tag in self.BLOCK:
            self._flush()
        if tag in self.VOID:
            return
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                was = self.skipping
                del self.stack[k:]
                if was and not self.skipping:
                    self.cur = []
                break

    def handle_data(self, data):
        if not self.skipping:
            self.cur.append(data)


def clean_html(text: str):
    p = _HTMLText()
    p.feed(text)
    p.close()
    p._flush()
    return p.paras


# ----------------------------------------------------------------------------- plain text

def clean_plain(text: str, max_indent: int = 5):
    lines = []
    for line in text.splitlines():
        ind = len(line) - len(line.lstrip())
        if line.strip() and (ind >= max_indent or _RST_UNDERLINE.match(line)):
            lines.append("")                                  # examples / rules end a paragraph
            continue
        lines.append(line)
    return paragraphs_from_lines(lines)


def clean_fortunes(text: str):
    out = []
    for f in re.split(r"^%\s*$", text, flags=re.M):
        lines = [norm_space(l) for l in f.strip("\n").splitlines()]
        lines = [l for l in lines if l]
        if lines:
            out.append("\n".join(lines))
    return out


# ----------------------------------------------------------------------------- sources

def sources(x: Path):
    """Yield (source, doc_id, [paragraphs]) for every document, in a fixed order."""
    pyd = x / "python3.11-doc/usr/share/doc/python3.11/html/_sources"
    for f in sorted(pyd.rglob("*.rst.txt")):
        rel = f.relative_to(pyd).as_posix()
        if rel.startswith(("whatsnew/changelog", "license")):
            continue
        yield "python-doc", rel, clean_rst(read_text(f))
    lxd = x / "linux-doc-6.1/usr/share/doc/linux-doc-6.1/html/_sources"
    for f in sorted(lxd.rglob("*.rst.txt")):
        rel = f.relative_to(lxd).as_posix()
        if rel.startswith("translations/"):
            continue
        yield "linux-doc", rel, clean_rst(read_text(f))
    for f in sorted((x / "perl-doc").rglob("*.pod*")):
        if f.name.startswith(("perl5", "perlartistic", "perlgpl")) and "delta" in f.name:
            continue
        yield "perl-doc", f.name, clean_pod(read_text(f))
    group, gid, size = [], 0, 0
    for entry in gcide_entries(x / "dict-gcide"):
        paras = clean_gcide_entry(entry)
        if not paras:
            continue
        group.append("\n".join(paras))
        size += sum(map(len, paras))
        if size >= DOC_TARGET_BYTES:
            yield "gcide", f"group{gid:05d}", group
            group, gid, size = [], gid + 1, 0
    if group:
        yield "gcide", f"group{gid:05d}", group
    fdir = x / "fortunes/usr/share/games/fortunes"
    mdir = x / "fortunes-min/usr/share/games/fortunes"
    for pkg, d in (("fortunes", fdir), ("fortunes-min", mdir)):
        for f in sorted(d.iterdir()):
            if f.suffix or f.is_dir() or f.name in ("ascii-art", "translate-me") or f.is_symlink():
                continue
            items = clean_fortunes(read_text(f))
            for k in range(0, len(items), 40):
                yield "fortunes", f"{pkg}/{f.name}/{k}", \
                    items[k:k + 40]
    yield "jargon", "jargon.txt", clean_plain(read_text(
        x / "jargon-text/usr/share/doc/jargon-text/jargon.txt.gz"))
    for name in ("standards", "maintain"):
        yield "gnu-standards", name, clean_plain(read_text(
            x / f"gnu-standards/usr/share/doc/gnu-standards/{name}.text.gz"))
    yield "debian-reference", "debian-reference.en.txt", clean_plain(read_text(
        x / "debian-reference-en/usr/share/debian-reference/debian-reference.en.txt.gz"))
    hb = x / "debian-handbook/usr/share/doc/debian-handbook/html/en-US"
    for f in sorted(hb.glob("*.html")):
        yield "debian-handbook", f.name, clean_html(read_text(f))
    dj = x / "python-django-doc/usr/share/doc/python-django-doc/html"
    for f in sorted(dj.rglob("*.html")):
        rel = f.relative_to(dj).as_posix()
        if rel.startswith(("_modules/", "genindex", "py-modindex", "search")):
            continue
        yield "django-doc", rel, clean_html(read_text(f))
    pg = x / "postgresql-doc-15/usr/share/doc/postgresql-doc-15/html"
    for f in sorted(pg.glob("*.html")):
        if f.name.startswith(("release-", "bookindex")):
            continue
        yield "postgresql-doc", f.name, clean_html(read_text(f))
    gh = x / "gimp-help-en/usr/share/gimp/2.0/help/en"
    for f in sorted(gh.rglob("*.html")):
        yield "gimp-help", f.relative_to(gh).as_posix(), clean_html(read_text(f))
    dh = x / "debian-history/usr/share/doc/debian-history"
    for f in sorted((dh / "docs").glob("*.en.html")):
        yield "debian-history", f.name, clean_html(read_text(f))
    for name in ("social-contract.txt.gz", "constitution.txt.gz", "debian-manifesto.gz"):
        if (dh / name).exists():
            yield "debian-history", name, clean_plain(read_text(dh / name), max_indent=99)
    for f in sorted((dh / "dedication").glob("dedication-*.txt")):
        if re.fullmatch(r"dedication-[\d.]+\.txt", f.name):
            yield "debian-history", f.name, clean_plain(read_text(f), max_indent=99)


_TYPO = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                      "\u2014": " - ", "\u2026": "...", "\u00a0": " ", "\u2192": "->"})


def para_key(p: str) -> bytes:
    return hashlib.blake2b(re.sub(r"\W+", " ", p.lower()).strip().encode(), digest_size=12).digest()


def build(x: Path):
    seen, docs, stats = set(), [], {}
    for src, doc_id, paras in sources(x):
        st = stats.setdefault(src, {"docs": 0, "paragraphs_in": 0, "paragraphs_kept": 0,
                                    "dup_paragraphs": 0, "bytes": 0})
        kept = []
        for p in paras:
            st["paragraphs_in"] += 1
            p = p.translate(_TYPO)
            lines = p.split("\n")
            if not all(good_paragraph(l) for l in lines if l) and not good_paragraph(p):
                continue
            k = para_key(p)
            if k in seen:
                st["dup_paragraphs"] += 1
                continue
            seen.add(k)
            kept.append(p)
        text = "\n\n".join(kept).strip()
        if len(text) < 200:
            continue
        st["docs"] += 1
        st["paragraphs_kept"] += len(kept)
        st["bytes"] += len(text.encode())
        docs.append((src, doc_id, text))
    return docs, stats


def split(docs):
    by_src = {}
    for d in docs:
        by_src.setdefault(d[0], []).append(d)
    held = set()
    for src, ds in by_src.items():
        total = sum(len(t) for _, _, t in ds)
        order = sorted(ds, key=lambda d: hashlib.sha256(f"{d[0]}/{d[1]}".encode()).hexdigest())
        acc = 0
        for d in order:
            if acc >= HELDOUT_FRACTION * total or len(ds) < 3:
                break
            held.add((d[0], d[1]))
            acc += len(d[2])
    train = [d for d in docs if (d[0], d[1]) not in held]
    heldout = [d for d in docs if (d[0], d[1]) in held]
    return train, heldout


_GCIDE_HEAD = re.compile(
    r"^(?P<hw>[A-Za-z][A-Za-z' -]{1,30}?)\s*(\([^)]*\))?,?\s+"
    r"(?P<pos>n|a|adv|v\. ?t|v\. ?i|v|prep|conj|interj|pron)\.(?P<rest>.*)$")
_ASK_WORD = ["What does \"{w}\" mean?", "Define the word \"{w}\".", "What is the meaning of {w}?",
             "Can you explain what {w} means?", "{w}: what does it mean?", "Give me a definition of {w}."]
_ASK_FORTUNE = ["Tell me a fortune.", "Say something wise.", "Tell me a joke.", "Give me a quote.",
                "Cheer me up.", "Tell me something funny.", "Share a fortune cookie with me."]
CHAT_MAX = {"gcide": 36000, "fortunes": 9000}


def chat(user: str, assistant: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>"


def chat_docs(train):
    """Single-turn ChatML conversations made from training documents only (dictionary entries ->
    "what does X mean?", fortunes -> "tell me a fortune"), so that `flashmoe demo --chat` has
    learned the template. Held-out documents are never used."""
    out, n = [], {"gcide": 0, "fortunes": 0}
    hsh = lambda s: int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
    for src, doc_id, text in train:
        if src not in n:
            continue
        for j, item in enumerate(text.split("\n\n")):
            key = f"{doc_id}/{j}"
            if n[src] >= CHAT_MAX[src] or hsh("take/" + key) % 3:
                continue
            if src == "gcide":
                lines = item.split("\n")
                m = _GCIDE_HEAD.match(lines[0])
                if not m:
                    continue
                rest = re.sub(r"^(\s*;?\s*(pl|imp|p\. ?p|sing|t|i)\.[^.]*\.)*", "", m.group("rest")).strip()
                if len(rest) < 25 and len(lines) > 1:
                    rest = re.sub(r"^\d+\.\s*", "", lines[1]).strip()
                if len(rest) < 25 or len(rest) > 600:
                    continue
                w = m.group("hw").strip()
                q = _ASK_WORD[hsh(key) % len(_ASK_WORD)].format(w=w)
                out.append((src + "-chat", key, chat(q, f"{w} ({m.group('pos')}.): {rest}")))
            else:
                if len(item) > 500:
                    continue
                q = _ASK_FORTUNE[hsh(key) % len(_ASK_FORTUNE)]
                out.append((src + "-chat", key, chat(q, item)))
            n[src] += 1
    return out


def write_docs(path: Path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for _, _, text in docs:
            f.write(text)
            f.write(f"\n{EOT}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".device/corpus")
    ap.add_argument("--work", default="/tmp/flashmoe-corpus")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    pkgs = fetch(work)
    copy_licences(work, out)
    docs, stats = build(work / "x")
    train, heldout = split(docs)
    chats = chat_docs(train)
    train += chats
    # interleave sources in training order deterministically (the trainer shuffles windows anyway)
    train.sort(key=lambda d: hashlib.sha256(f"order/{d[0]}/{d[1]}".encode()).hexdigest())
    write_docs(out / "train.txt", train)
    write_docs(out / "heldout.txt", heldout)
    raw = (out / "train.txt").read_bytes()
    (out / "train.txt.xz").write_bytes(lzma.compress(raw, preset=6))
    held_src = {}
    for s, _, t in heldout:
        held_src[s] = held_src.get(s, 0) + len(t.encode())
    manifest = {
        "packages": pkgs,
        "debian_release": Path("/etc/debian_version").read_text().strip()
        if Path("/etc/debian_version").exists() else None,
        "sources": stats,
        "heldout_bytes_by_source": held_src,
        "train": {"docs": len(train), "bytes": len(raw),
                  "sha256": hashlib.sha256(raw).hexdigest()},
        "heldout": {"docs": len(heldout), "bytes": (out / "heldout.txt").stat().st_size,
                    "sha256": hashlib.sha256((out / "heldout.txt").read_bytes()).hexdigest()},
        "chat_docs": {"count": len(chats), "bytes": sum(len(t.encode()) for _, _, t in chats),
                      "note": "single-turn ChatML conversations generated from training documents"},
        "heldout_fraction": HELDOUT_FRACTION,
        "document_separator": EOT,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for s, st in stats.items():
        print(f"{s:18s} docs {st['docs']:6d}  paragraphs {st['paragraphs_kept']:7d}/{st['paragraphs_in']:7d}"
              f"  dup {st['dup_paragraphs']:6d}  {st['bytes'] / 1e6:7.2f} MB")
    print(f"train {len(train)} docs {len(raw) / 1e6:.2f} MB; held-out {len(heldout)} docs "
          f"{manifest['heldout']['bytes'] / 1e3:.0f} kB; xz {(out / 'train.txt.xz').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
