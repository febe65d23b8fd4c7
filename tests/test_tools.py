"""Tool calls through the model's own chat template (adapters/chat.py, runtime/tools.py), and
llama-cpp-python's chatml-function-calling handler driving our Llama. Shapes are checked with
the openai package's pydantic models where it is installed."""
import json

import pytest

from flashmoe_plugin.runtime.tools import HERMES, CallStream, for_template, takes_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}




def _check_call(call, tool):
    jsonschema = pytest.importorskip("jsonschema")
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == tool["function"]["name"]
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, {**tool["function"]["parameters"], "additionalProperties": False})
    return args


def test_named_tool_choice_returns_a_parsed_call(llm):
    out = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice=NAMED, seed=1, max_tokens=60)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["role"] == "assistant" and msg["content"] is None
    assert len(msg["tool_calls"]) == 1
    _check_call(msg["tool_calls"][0], WEATHER)
    assert msg["function_call"] == msg["tool_calls"][0]["function"]  # legacy field, as llama-cpp-python
    openai = pytest.importorskip("openai")
    openai.types.chat.ChatCompletion(**out)


def test_required_calls_some_tool(llm):
    out = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", seed=4, max_tokens=60)
    calls = out["choices"][0]["message"]["tool_calls"]
    assert calls and out["choices"][0]["finish_reason"] == "tool_calls"
    for c in calls:
        _check_call(c, {t["function"]["name"]: t for t in TOOLS}[c["function"]["name"]])


def test_streamed_named_call_has_llama_cpp_python_chunk_shapes(llm):
    openai = pytest.importorskip("openai")
    chunks = list(llm.create_chat_completion(ASK, tools=TOOLS, tool_choice=NAMED, seed=2, max_tokens=60,
                                             stream=True))
    for c in chunks:
        openai.types.chat.ChatCompletionChunk(**c)
        assert c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [d for c in chunks for d in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert [d["index"] for d in deltas] == [0]
    call = {k: deltas[0][k] for k in ("id", "type", "function")}
    _check_call(call, WEATHER)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # the same call, not streamed
    whole = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice=NAMED, seed=2, max_tokens=60)
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"] == call["function"]


def test_auto_and_none(llm):
    """auto: the tiny model answers in text, which stays content; none: no tools in the prompt."""
    auto = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="auto", seed=2, max_tokens=8)
    msg = auto["choices"][0]["message"]
    assert isinstance(msg["content"], str) and "tool_calls" not in msg
    n_auto = auto["usage"]["prompt_tokens"]
    none = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="none", seed=2, max_tokens=4)
    plain = llm.create_chat_completion(ASK, seed=2, max_tokens=4)
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] < n_auto


def test_tool_conversation_renders_through_the_template(llm):
    """An assistant call (OpenAI's JSON-string arguments) and the tool's answer reach the model."""
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    from flashmoe_plugin.runtime.chat import render
    text = render(llm._tok.chat_template, for_template(history), tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    out = llm.create_chat_completion(history, tools=TOOLS, seed=1, max_tokens=4)
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_unknown_tool_and_bad_choice(llm):
    with pytest.raises(ValueError, match="not found"):
        llm.create_chat_completion(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice"):
        llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="sometimes")
    with pytest.raises(ValueError, match="needs tools"):
        llm.create_chat_completion(ASK, tool_choice=NAMED)


def test_template_without_tools_is_an_error_not_a_silent_drop(tmp_path):
    """A copy of the demo store whose template (plain ChatML) never reads `tools`."""
    import flashmoe_plugin
    from flashmoe_plugin import Llama
    src = flashmoe_plugin.demo_model_path()
    dst = tmp_path / "store"
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    (dst / "tokenizer_config.json").unlink()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
                            "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}"
                            "{% endif %}")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not takes_tools(cfg["chat_template"])
    with Llama(model_path=str(dst), verbose=False) as m:
        for choice in ("auto", "required", NAMED):
            with pytest.raises(ValueError, match="does not read `tools`"):
                m.create_chat_completion(ASK, tools=TOOLS, tool_choice=choice, max_tokens=2)
        assert m.create_chat_completion(ASK, tools=TOOLS, tool_choice="none", max_tokens=2)["choices"]


def test_llama_cpp_python_grammar_handlers_on_our_object():
    """llama-cpp-python's own grammar-building handlers (chatml-function-calling, functionary),
    called on a flashmoe Llama."""
    pytest.importorskip("llama_cpp")
    from flashmoe_plugin import Llama
    with Llama(model_path="demo", n_ctx=1024, chat_format="chatml-function-calling", verbose=False) as m:
        out = m.create_chat_completion(ASK, tools=TOOLS, tool_choice=NAMED, seed=1, max_tokens=40)
        calls = out["choices"][0]["message"]["tool_calls"]
        assert out["choices"][0]["finish_reason"] == "tool_calls" and len(calls) == 1
        assert calls[0]["function"]["name"] == "get_weather"
        assert isinstance(json.loads(calls[0]["function"]["arguments"], strict=False), dict)
        auto = m.create_chat_completion(ASK, tools=TOOLS, tool_choice="auto", seed=1, max_tokens=40)
        msg = auto["choices"][0]["message"]
        assert msg.get("tool_calls") or isinstance(msg["content"], str)
    with Llama(model_path="demo", n_ctx=1024, chat_format="functionary", verbose=False) as m:
        out = m.create_chat_completion(ASK, tools=TOOLS, tool_choice=NAMED, seed=1, max_tokens=40)
        call = out["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        # strict=False: llama-cpp-python's schema grammar lets strings hold raw control characters
        assert isinstance(json.loads(call["function"]["arguments"], strict=False), dict)


# ---------------------------------------------------------------------- parsing, no model
def test_parse_hermes_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>')
    content, calls = HERMES.parse(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert len({c["id"] for c in calls}) == 2
    assert HERMES.parse("no calls here") == ("no calls here", [])
    assert HERMES.parse("<tool_call>\nnot json\n</tool_call>")[1] == []
    # cut by max_tokens inside the closing tag: the call is complete
    assert HERMES.parse('<tool_call>\n{"name": "add", "arguments": {}}\n</tool')[1][0]["function"]["name"] == "add"


def test_call_stream_splits_at_any_boundary():
    text = 'Sure: <tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n' \
           '{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
    for step in (1, 3, 7, len(text)):
        s = CallStream(HERMES)
        events = []
        for i in range(0, len(text), step):
            events += s.feed(text[i:i + step])
        events += s.finish()
        content = "".join(v for k, v in events if k == "content")
        calls = [json.loads(v["function"]["arguments"]) for k, v in events if k == "call"]
        assert content == "Sure: " and calls == [{"a": 1}, {"a": 2}], step
    s = CallStream(HERMES)
    assert s.feed("a <tool") == [("content", "a ")]  # held back: could be a call
    assert s.feed("box>") == [("content", "<toolbox>")]


def test_template_with_tools_in_an_unknown_syntax_is_an_error():
    from flashmoe_plugin.runtime.tools import ToolsError, tool_syntax
    template = "{% for t in tools %}{{ t | tojson }}{% endfor %}[TOOL_CALLS]"
    assert takes_tools(template)
    with pytest.raises(ToolsError, match="syntax flashmoe does not parse"):
        tool_syntax(template)
    assert tool_syntax("{{ tools }} <tool_call>") is HERMES


# ---------------------------------------------------------------------- Qwen3-Coder / Qwen3.5 XML calls
XML_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools>

To call a function reply with:
<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
</function>
</tool_call><|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}{%- set c = c.function if c.function is defined else c %}
<tool_call>
<function={{ c.name }}>
{% for k, v in c.arguments | items %}<parameter={{ k }}>
{{ v if v is string else v | tojson }}
</parameter>
{% endfor %}</function>
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_qwen_xml_calls_parse_and_stream():
    from flashmoe_plugin.runtime.tools import QWEN_XML, tool_syntax
    assert tool_syntax(XML_TEMPLATE) is QWEN_XML
    text = ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York <NY>\n</parameter>\n"
            "<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=add>\n"
            "<parameter=a>\n2\n</parameter>\n<parameter=b>\n-3\n</parameter>\n</function>\n</tool_call>")
    content, calls = QWEN_XML.parse(text, TOOLS)
    assert content == "Checking."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "New York <NY>", "unit": "C"},
                                                                       {"a": 2, "b": -3}]
    s = CallStream(QWEN_XML, TOOLS)
    events = [e for i in range(0, len(text), 5) for e in s.feed(text[i:i + 5])] + s.finish()
    assert [k for k, _ in events if k == "call"] == ["call", "call"]
    assert "".join(v for k, v in events if k == "content").strip() == "Checking."


def test_qwen_xml_named_call_end_to_end(tmp_path):
    """The demo weights behind a Qwen3-Coder style template: a named call is forced in that syntax
    and parsed back with typed arguments."""
    import flashmoe_plugin
    from flashmoe_plugin import Llama
    src = flashmoe_plugin.demo_model_path()
    dst = tmp_path / "store"
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "tokenizer_config.json":
            (dst / p.name).symlink_to(p)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": XML_TEMPLATE}))
    with Llama(model_path=str(dst), n_ctx=1024, verbose=False) as m:
        for choice, tool in ((NAMED, WEATHER), ({"type": "function", "function": {"name": "add"}}, ADD)):
            out = m.create_chat_completion(ASK, tools=TOOLS, tool_choice=choice, seed=3, max_tokens=60)
            calls = out["choices"][0]["message"]["tool_calls"]
            assert out["choices"][0]["finish_reason"] == "tool_calls" and len(calls) == 1
            _check_call(calls[0], tool)
