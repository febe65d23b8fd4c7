"""Tool calls: which syntax a chat template writes them in, the grammar that forces a call, and
parsing the model's text back into OpenAI `tool_calls`.

The tools themselves reach the model through its own chat template (the `tools` variable of HF
templates, runtime.chat.render); a template that never reads `tools` cannot show them to the
model, which is an error here, never a silent drop. The syntax of a call is read off the
template: Hermes/Qwen style `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(Qwen2/3-MoE, Hermes fine-tunes) and the XML of Qwen3-Coder / Qwen3.5 (`<function=NAME>` with
one `<parameter=KEY>` block per argument).

    syntax = tool_syntax(template)                  # ToolsError where there is none
    grammar = syntax.grammar(tools)                 # Lark for runtime.constraints: one call or more
    content, calls = syntax.parse(text, tools)      # calls: OpenAI tool_calls dicts
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from .constraints import JSON_STYLE, Grammar


class ToolsError(ValueError):
    pass


@lru_cache(maxsize=8)
def template_variables(template: str) -> frozenset:
    """The variables a jinja template reads (undeclared names)."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return frozenset(meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template)))


def takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template_variables(template)


def tool_name(tool: dict) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolsError(f"a tool must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}, "
                         f"got {json.dumps(tool)[:200]}")
    return fn["name"]


def _parameters(tool: dict) -> dict:
    """The tool's parameter schema; a forced call passes only the declared parameters (an object
    schema that does not say otherwise gets additionalProperties false, as OpenAI's strict mode)."""
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    if not isinstance(params, dict) or not params:
        return {"type": "object"}
    if "properties" in params and "additionalProperties" not in params:
        params = {**params, "additionalProperties": False}
    return params


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    open: str
    close: str

    def grammar(self, tools: list[dict], many: bool = True) -> Grammar:
        """Text that is one call (or with many=True one or more) of these tools, arguments valid
        against each tool's schema."""
        schemas = [{"type": "object", "properties": {"name": {"const": tool_name(t)}, "arguments": _parameters(t)},
                    "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        schema = {**schema, "x-guidance": JSON_STYLE}
        start = 'call ("\\n" call)*' if many else "call"
        return Grammar.lark(f"start: {start}\ncall: {json.dumps(self.open)} body {json.dumps(self.close)}\n"
                            f"body: %json {json.dumps(schema)}\n")

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
        """(content outside the calls or None, OpenAI tool_calls). A block that does not parse
        stays in the content (the model wrote text, not a call)."""
        calls, rest, pos = [], [], 0
        pat = re.compile(re.escape(self.open.strip()) + r"(.*?)(?:" + re.escape(self.close.strip()) + r"|\Z)", re.S)
        for m in pat.finditer(text):
            call = self._call(m.group(1), tools or [])
            if call is None:
                continue
            rest.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        rest.append(text[pos:])
        content = "".join(rest).strip()
        return (content or None) if calls else text, calls

    @staticmethod
    def _call(body: str, tools: list[dict]) -> dict | None:
        try:  # the first JSON value: a call cut off by max_tokens inside its closing tag still counts
            obj, _ = json.JSONDecoder().raw_decode(body.strip())
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        return openai_call(obj["name"], obj.get("arguments", obj.get("parameters", {})))


class XmlToolSyntax(ToolSyntax):
    """Qwen3-Coder / Qwen3.5: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n
    </function>\n</tool_call>`, strings raw, other values as JSON. Forced string values cannot
    contain "<" (the grammar has no "anything but </parameter>" without look-ahead)."""

    def grammar(self, tools: list[dict], many: bool = True) -> Grammar:
        rules, fns = [], []
        for i, t in enumerate(tools):
            params = _parameters(t)
            props, required = params.get("properties") or {}, set(params.get("required") or ())
            parts = []
            for j, (key, sch) in enumerate(props.items()):
                end = json.dumps("\n</parameter>\n")
                if sch.get("type") == "string" and "enum" not in sch:  # one lexeme: a greedy text
                    value = r"/[^<]*\n<\/parameter>\n/"                # would eat the newline before the tag
                elif sch.get("type") == "string":
                    value = f"({' | '.join(json.dumps(v) for v in sch['enum'])}) {end}"
                else:
                    value = f"%json {json.dumps({**sch, 'x-guidance': JSON_STYLE})} {end}"
                rules.append(f"p{i}_{j}: {json.dumps(f'<parameter={key}>' + chr(10))} {value}")
                parts.append(f"p{i}_{j}" + ("" if key in required else "?"))
            rules.append(f"f{i}: {json.dumps(tool_name(t) + '>' + chr(10))} {' '.join(parts)}")
            fns.append(f"f{i}")
        start = 'call ("\\n" call)*' if many else "call"
        head, tail = json.dumps("<tool_call>\n<function="), json.dumps("</function>\n</tool_call>")
        return Grammar.lark(f"start: {start}\ncall: {head} ({' | '.join(fns)}) {tail}\n" + "\n".join(rules) + "\n")

    @staticmethod
    def _call(body: str, tools: list[dict]) -> dict | None:
        m = re.search(r"<function=([^>\n]+)>(.*?)(?:</function>|\Z)", body, re.S)
        if m is None:
            return None
        name = m.group(1).strip()
        props = next((_parameters(t).get("properties") or {} for t in tools if tool_name(t) == name), {})
        args = {k: _xml_value(v, props.get(k) or {})
                for k, v in re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", m.group(2), re.S)}
        return openai_call(name, args)


def _xml_value(text: str, schema: dict):
    if schema.get("type") == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:  # the template writes non-JSON scalars with Python's str(): True, False, None
        return {"True": True, "False": False, "None": None}.get(text.strip(), text)


HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>")
QWEN_XML = XmlToolSyntax("qwen3_coder_xml", "<tool_call>\n", "\n</tool_call>")
_MARKERS = (("<function=", QWEN_XML), ("<tool_call>", HERMES))  # most specific first


def tool_syntax(template: str | None) -> ToolSyntax:
    if not takes_tools(template):
        raise ToolsError("this model's chat template does not read `tools`, so it cannot show tools to the model; "
                         "use a chat template that does (the model's tokenizer_config.json / chat_template.jinja), "
                         "or chat_format='chatml-function-calling' (llama-cpp-python's prompt-based tool calling)")
    for marker, syntax in _MARKERS:
        if marker in template:
            return syntax
    raise ToolsError("this model's chat template reads `tools` but writes calls in a syntax flashmoe does not "
                     "parse yet (known: Hermes/Qwen <tool_call> JSON, Qwen3-Coder/Qwen3.5 <function=...> XML)")


def for_template(messages: list[dict]) -> list[dict]:
    """Messages as HF templates expect them: an assistant's tool call arguments as objects (OpenAI
    sends JSON strings; templates write `arguments | tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


class CallStream:
    """Splits streamed text into content pieces and whole calls as they complete: text that could
    still become the start of a call is held back."""

    def __init__(self, syntax: ToolSyntax, tools: list[dict] | None = None):
        self.s, self.tools = syntax, tools
        self.buf = ""
        self.in_call = False
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out = []
        opener, closer = self.s.open.strip(), self.s.close.strip()
        while True:
            if not self.in_call:
                i = self.buf.find(opener)
                if i < 0:
                    keep = _partial_suffix(self.buf, opener)
                    if self.calls and not self.buf[:len(self.buf) - keep].strip():
                        return out  # whitespace after a call is not content (yet)
                    if len(self.buf) > keep:
                        out.append(("content", self.buf[:len(self.buf) - keep]))
                        self.buf = self.buf[len(self.buf) - keep:]
                    return out
                if self.buf[:i].strip():
                    out.append(("content", self.buf[:i]))
                self.buf, self.in_call = self.buf[i:], True
            j = self.buf.find(closer)
            if j < 0:
                return out
            block = self.buf[:j + len(closer)]
            self.buf, self.in_call = self.buf[j + len(closer):].lstrip("\n"), False
            _, calls = self.s.parse(block, self.tools)
            self.calls += len(calls)
            out.extend(("call", c) for c in calls) if calls else out.append(("content", block))

    def finish(self) -> list[tuple[str, object]]:
        text, self.buf = self.buf, ""
        if not text or (self.calls and not text.strip()):
            return []
        if self.in_call:
            _, calls = self.s.parse(text, self.tools)
            if calls:
                return [("call", c) for c in calls]
        return [("content", text)]


def _partial_suffix(buf: str, word: str) -> int:
    for k in range(min(len(word) - 1, len(buf)), 0, -1):
        if buf.endswith(word[:k]):
            return k
    return 0
