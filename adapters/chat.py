"""The chat handler over a store's own jinja template, in llama-cpp-python's handler protocol
(`handler(llama=..., messages=..., **sampling) -> chat.completion dict | chunk iterator`).

template -> tokens (special=True, no extra BOS) -> `llama.create_completion` with the template's
end token as stop -> chat dicts, as llama_chat_format's Jinja2ChatFormatter handler does, plus
what that one lacks: `response_format` (json_object, json_schema) and tools. Tools go through the
template's `tools` variable; `tool_choice` "auto" parses calls out of the text, "required" and a
named function constrain the text to calls (runtime.tools), "none" renders without tools. Dict
and chunk shapes are llama-cpp-python's (tool calls as its chatml-function-calling returns them).
"""
from __future__ import annotations

from typing import Iterator

from flashmoe_plugin.runtime.chat import render
from flashmoe_plugin.runtime.constraints import Grammar
from flashmoe_plugin.runtime.tools import CallStream, ToolsError, for_template, tool_name, tool_syntax


def response_format_grammar(response_format) -> Grammar | None:
    """OpenAI's {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": ...}}
    and llama-cpp-python's {"type": "json_object", "schema": ...} as a grammar."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Grammar.json_schema(response_format.get("schema"))
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", response_format.get("schema"))
        if schema is None:
            raise ValueError("response_format json_schema needs json_schema.schema (a JSON schema object)")
        return Grammar.json_schema(schema)
    raise ValueError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")


def _tool_plan(template, tools, tool_choice):
    """(tools to render, syntax or None, grammar forcing calls or None)."""
    if not tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if not tools or tool_choice == "none":
        return None, None, None
    names = [tool_name(t) for t in tools]
    syntax = tool_syntax(template)  # ToolsError when the template cannot show tools
    if tool_choice in (None, "auto"):
        return tools, syntax, None
    if tool_choice == "required":
        return tools, syntax, syntax.grammar(tools)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise ValueError(f"Tool choice '{name}' not found in tools.")
        return tools, syntax, syntax.grammar([tools[names.index(name)]], many=False)
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}, not {tool_choice!r}")


def template_chat_handler(template: str, bos_token: str, eos_token: str):
    def handler(*, llama, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0, stream=False, stop=[],
                seed=None, response_format=None, max_tokens=None, presence_penalty=0.0, frequency_penalty=0.0,
                repeat_penalty=1.0, tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                logits_processor=None, grammar=None, logit_bias=None, logprobs=None, top_logprobs=None, **kwargs):
        if functions is not None and tools is None:  # legacy functions/function_call, as llama-cpp-python maps them
            tools = [{"type": "function", "function": f} for f in functions]
        if function_call is not None and tool_choice is None:
            tool_choice = (function_call if isinstance(function_call, str)
                           else {"type": "function", "function": {"name": function_call.get("name")}})
        try:
            shown, syntax, call_grammar = _tool_plan(template, tools, tool_choice)
        except ToolsError as e:
            raise ValueError(f"{llama.model_path}: {e}") from None
        fmt = response_format_grammar(response_format)
        if call_grammar is not None:
            grammar = call_grammar
        elif fmt is not None:
            grammar = fmt
        extra = {"tools": shown} if shown else {}
        prompt = render(template, for_template(list(messages)), add_generation_prompt=True, bos_token=bos_token,
                        eos_token=eos_token, **extra, **kwargs)
        ids = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if eos_token:
            stop = stop + [eos_token]
        # differs: logprobs=True without top_logprobs still returns the chosen tokens' logprobs
        n_logprobs = (top_logprobs or 0) if logprobs else None
        completion = llama.create_completion(
            prompt=ids, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            logprobs=n_logprobs, stream=stream, stop=stop, seed=seed, max_tokens=max_tokens,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, logits_processor=logits_processor, grammar=grammar, logit_bias=logit_bias)
        if syntax is None:
            return chat_chunks(completion) if stream else chat_completion(completion)
        return tool_chunks(completion, syntax, shown) if stream else tool_completion(completion, syntax, shown)

    return handler


def chat_logprobs(lp):
    if lp is None:
        return None
    return {"content": [{"token": token, "bytes": None, "logprob": value,
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in (top or {}).items()]}
                        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])],
            "refusal": None}


def chat_completion(c: dict) -> dict:
    choice = c["choices"][0]
    return {"id": "chat" + c["id"], "object": "chat.completion", "created": c["created"], "model": c["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice["text"]},
                         "logprobs": chat_logprobs(choice["logprobs"]), "finish_reason": choice["finish_reason"]}],
            "usage": c["usage"]}


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    for i, c in enumerate(chunks):
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        choice = c["choices"][0]
        yield {**head, "choices": [{"index": 0,
                                    "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                                    "logprobs": chat_logprobs(choice["logprobs"]),
                                    "finish_reason": choice["finish_reason"]}]}


def tool_completion(c: dict, syntax, tools=None) -> dict:
    """A completion whose text may hold calls: message.tool_calls and finish_reason "tool_calls"
    when it does (plus the legacy function_call for a single call, as llama-cpp-python)."""
    out = chat_completion(c)
    content, calls = syntax.parse(c["choices"][0]["text"], tools)
    if calls:
        message = {"role": "assistant", "content": content, "tool_calls": calls}
        if len(calls) == 1:
            message["function_call"] = dict(calls[0]["function"])
        out["choices"][0].update(message=message, finish_reason="tool_calls")
    return out


def tool_chunks(chunks: Iterator[dict], syntax, tools=None) -> Iterator[dict]:
    """Content as ordinary deltas; each call as one delta once it is complete, in the shape of
    llama-cpp-python's chatml-function-calling stream (tool_calls[i] with index, id, type,
    function {name, arguments}); finish_reason "tool_calls" when any call was made."""
    split, n_calls, head = CallStream(syntax, tools), 0, None
    for c in chunks:
        if head is None:
            head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"],
                    "object": "chat.completion.chunk"}
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        choice = c["choices"][0]
        events = split.feed(choice["text"]) if choice["finish_reason"] is None else split.finish()
        for kind, value in events:
            if kind == "content":
                if value:
                    yield {**head, "choices": [{"index": 0, "delta": {"content": value}, "logprobs": None,
                                                "finish_reason": None}]}
            else:
                call = {"index": n_calls, **value}
                fn = dict(value["function"])
                n_calls += 1
                yield {**head, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                            "delta": {"role": None, "content": None, "function_call": fn,
                                                      "tool_calls": [call]}}]}
        if choice["finish_reason"] is not None:
            if n_calls:
                yield {**head, "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                                            "delta": {"role": None, "content": None, "function_call": None,
                                                      "tool_calls": None}}]}
            else:
                yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                            "finish_reason": choice["finish_reason"]}]}
