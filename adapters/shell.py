"""`flashmoe chat MODEL`: an interactive chat shell (prompt-toolkit) over one `Llama`.

Replies are rendered through the model's own chat template and streamed as they are sampled.
Enter sends, Alt-Enter (Esc then Enter) starts a new line, pasted text keeps its lines; input
history is kept in a file. Ctrl-C while a reply streams stops that reply and keeps the
conversation (the partial reply stays in it); Ctrl-C at the prompt clears the line; Ctrl-D or
/exit leaves. The bottom toolbar shows the decode rate, where the experts came from (share of
expert requests served per tier), disk bytes read per token and the process's resident memory,
from the engine's own per-token figures (the on_token hook, see telemetry.py); while a reply
streams it stays on the terminal's last row, updated live (a scroll region keeps it there).

    ChatShell(llm, input=create_pipe_input(), output=DummyOutput(), stdout=io.StringIO()).run()
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from .llama_cpp import LogitsProcessorList
from .telemetry import GenerationWatch, watch

HELP = """commands:
  /help            this help
  /reset           forget the conversation (the system prompt stays)
  /system [TEXT]   show or set the system prompt
  /stats           the last reply's figures and the expert pager's totals
  /save FILE       save the conversation as JSON
  /load FILE       load a conversation saved with /save
  /exit            leave (also Ctrl-D)
keys: Enter sends, Alt-Enter (Esc Enter) adds a line, Ctrl-C stops a reply"""


def default_history_file() -> Path:
    from platformdirs import user_data_dir
    path = Path(user_data_dir("flashmoe")) / "chat_history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resident_memory() -> int:
    """This process's resident set size in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def _size(n: float) -> str:
    from flashmoe_plugin.sizes import format_size
    return format_size(n)


class _EchoOff:
    """Terminal echo off while a reply streams (Ctrl-C still signals: only ECHO is cleared)."""

    def __init__(self):
        self.saved = None
        try:
            import termios
            if sys.stdin.isatty():
                fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(fd)
                quiet = list(self.saved)
                quiet[3] &= ~termios.ECHO
                termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):
            self.saved = None

    def restore(self):
        if self.saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self.saved)


class _LiveStatus:
    """A status line on the terminal's last row while text scrolls above it: the scroll region
    (DECSTBM) excludes that row, as apt's progress bar does. Only on a real terminal."""

    def __init__(self, out: TextIO, interval: float = 0.25):
        import shutil
        self.out, self.interval, self.shown = out, interval, 0.0
        try:
            tty = out.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        except (AttributeError, ValueError):
            tty = False
        size = shutil.get_terminal_size((0, 0))
        self.rows, self.cols = size.lines, size.columns
        self.active = tty and self.rows > 2
        if self.active:  # make room, then keep the last row out of the scrolling region
            self.out.write(f"\n\0337\033[1;{self.rows - 1}r\0338\033[1A")
            self.out.flush()

    def update(self, text: str):
        import time
        now = time.monotonic()
        if not self.active or now - self.shown < self.interval:
            return
        self.shown = now
        self.out.write(f"\0337\033[{self.rows};1H\033[2K\033[7m{text[: self.cols - 1]}\033[0m\0338")
        self.out.flush()

    def close(self):
        if self.active:
            self.active = False
            self.out.write(f"\0337\033[r\033[{self.rows};1H\033[2K\0338")
            self.out.flush()


class _Stop(Exception):
    """Raised inside the sampler once Ctrl-C asked the reply to stop."""


class ChatShell:
    def __init__(self, llm, system: Optional[str] = None, max_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None, history_file=None, input=None, output=None,
                 stdout: Optional[TextIO] = None):
        self.llm = llm
        self.system = system
        self.messages: list[dict] = []
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.stdout = stdout or sys.stdout
        self.last: Optional[GenerationWatch] = None
        self._stop = threading.Event()
        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        history = FileHistory(str(history_file)) if history_file else InMemoryHistory()
        self.session = PromptSession(history=history, input=input, output=output, key_bindings=keys,
                                     bottom_toolbar=self.toolbar, multiline=False, prompt_continuation="... ")

    # ------------------------------------------------------------------ output
    def say(self, text: str = "", end: str = "\n"):
        self.stdout.write(text + end)
        self.stdout.flush()

    def toolbar(self, w: Optional[GenerationWatch] = None) -> str:
        w = w or self.last
        parts = []
        if w is not None and w.tokens:
            parts.append(f"{w.tokens_per_second:.1f} tok/s")
            rates = w.hit_rates()
            if rates:
                parts.append("experts " + " ".join(f"{tier} {rate:.0%}" for tier, rate in rates.items()))
            parts.append(f"{_size(w.bytes_read_per_token)} read/token")
        parts.append(f"RSS {_size(resident_memory())}")
        parts.append(f"ctx {self.llm.n_tokens}/{self.llm.n_ctx()}")
        parts.append("/help")
        return " | ".join(parts)

    # ------------------------------------------------------------------ loop
    def run(self):
        self.say(f"flashmoe chat: {self.llm.model_path} (/help for commands, Ctrl-D to leave)")
        while True:
            try:
                line = self.session.prompt("> ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt: a fresh line
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    break
                continue
            self.reply(line)
        self.say("bye")

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, text: str):
        """Stream the model's answer to `text`; Ctrl-C stops it and keeps what was said."""
        self.messages.append({"role": "user", "content": text})
        self._stop.clear()
        stopped, pieces = False, []

        def check(input_ids, scores):
            if self._stop.is_set():
                raise _Stop()
            return scores

        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        if previous is not None:
            signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        echo = _EchoOff()  # keys typed during a reply wait for the next prompt instead of landing in it
        status = _LiveStatus(self.stdout)  # the toolbar stays on the bottom line while the reply streams
        try:
            with watch(on_token=lambda w, _: status.update(self.toolbar(w))) as w:
                stream = self.llm.create_chat_completion(
                    messages=self.conversation(), stream=True, max_tokens=self.max_tokens,
                    temperature=self.temperature, seed=self.seed, logits_processor=LogitsProcessorList([check]))
                try:
                    for chunk in stream:
                        piece = (chunk["choices"][0].get("delta") or {}).get("content") or ""
                        if piece:
                            pieces.append(piece)
                            self.say(piece, end="")
                        if self._stop.is_set():
                            raise _Stop()
                finally:
                    stream.close()
        except _Stop:
            stopped = True
        except (ValueError, NotImplementedError) as e:  # e.g. the context is full
            self.messages.pop()
            self.say(f"\n[error: {e}]")
            return
        finally:
            status.close()
            echo.restore()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if w.tokens:
            self.last = w  # the toolbar and /stats show the last reply that produced tokens
        self.say(("\n[stopped]" if stopped else "") + f"\n[{w.tokens} tokens, {w.tokens_per_second:.1f} tok/s]")

    # ------------------------------------------------------------------ slash commands
    def command(self, line: str) -> Optional[str]:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.messages.clear()
            self.llm.reset()
            self.say("[conversation cleared]")
        elif name == "/system":
            if arg:
                self.system = arg
                self.say("[system prompt set]")
            else:
                self.say(f"[system prompt: {self.system!r}]")
        elif name == "/stats":
            self.say(self.stats())
        elif name == "/save":
            if not arg:
                self.say("[usage: /save FILE]")
            else:
                Path(arg).write_text(json.dumps({"system": self.system, "messages": self.messages}, indent=1))
                self.say(f"[saved {len(self.messages)} messages to {arg}]")
        elif name == "/load":
            self.load(arg)
        else:
            self.say(f"[unknown command {name}; /help lists them]")
        return None

    def load(self, path: str):
        if not path:
            self.say("[usage: /load FILE]")
            return
        try:
            data = json.loads(Path(path).read_text())
            messages = data["messages"]
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError("every message needs a role and a content")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.say(f"[cannot load {path}: {e}]")
            return
        self.system, self.messages = data.get("system"), list(messages)
        self.say(f"[loaded {len(self.messages)} messages from {path}]")

    def stats(self) -> str:
        lines = []
        w = self.last
        if w is not None and w.tokens:
            rates = ", ".join(f"{tier} {rate:.1%}" for tier, rate in w.hit_rates().items())
            lines.append(f"last reply: {w.tokens} tokens, {w.tokens_per_second:.2f} tok/s; experts served by {rates}; "
                         f"{_size(w.bytes_read_per_token)} read from disk per token")
        p = self.llm.pager_stats
        lines.append(f"pager totals: {p['hits']} hits ({p['device_hits']} device, {p['host_hits']} host), "
                     f"{p['misses']} misses (hit rate {p['hit_rate']:.1%}), {p['evictions']} evictions, "
                     f"{_size(p['bytes_read'])} read")
        lines.append(f"context: {self.llm.n_tokens}/{self.llm.n_ctx()} tokens; resident memory {_size(resident_memory())}")
        return "\n".join(lines)
