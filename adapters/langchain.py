"""LangChain classes over a flashmoe model (langchain-core only):

    from flashmoe_plugin.adapters.langchain import FlashMoE, ChatFlashMoE
    llm = FlashMoE(model_path="./mixtral-q4", max_tokens=64)          # an LLM (text in, text out)
    chat = ChatFlashMoE(model_path="./mixtral-q4", ram_budget="8G")   # a chat model
    chat = ChatFlashMoE(client=existing_llama)                        # share one loaded Llama
    chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?").tool_calls
    chat.with_structured_output(Person, method="json_schema").invoke("...")

Parameter names and defaults are those of langchain-community's `LlamaCpp` / `ChatLlamaCpp`
where the meaning is the same (model_path, client, n_ctx, max_tokens, temperature, top_p, top_k,
repeat_penalty, stop, seed, streaming, grammar, model_kwargs, verbose, ...), plus flashmoe's
engine options (device, ram_budget, vram_budget, cache_policy, prefetch). The model loads on
first use, not at construction, and one `Llama` is used by one generation at a time (a lock:
LangChain's async and batch paths run generations on worker threads).
"""
from __future__ import annotations

import json
import threading
import weakref
from operator import itemgetter
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Type, Union

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, FunctionMessage,
                                     HumanMessage, SystemMessage, ToolMessage)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .telemetry import GenerationWatch, watch, watched

_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_of(llama) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(llama)
        if lock is None:
            lock = _LOCKS[llama] = threading.Lock()
        return lock


class _FlashMoEBase(BaseModel):
    """Fields and model loading shared by FlashMoE and ChatFlashMoE."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    client: Any = Field(default=None, exclude=True)  #: an existing flashmoe_plugin.Llama (or loaded lazily)
    model_path: Optional[str] = None                 #: a store folder, a .gguf file, or "demo"
    n_ctx: int = 512
    seed: int = -1
    n_threads: Optional[int] = None
    n_batch: Optional[int] = 8
    logits_all: bool = False
    last_n_tokens_size: Optional[int] = 64
    max_tokens: Optional[int] = 256
    temperature: Optional[float] = 0.8
    top_p: Optional[float] = 0.95
    top_k: Optional[int] = 40
    repeat_penalty: Optional[float] = 1.1
    stop: Optional[List[str]] = None
    grammar: Any = None                              #: a GBNF string or LlamaGrammar, passed to the Llama
    grammar_path: Optional[str] = None
    model_kwargs: Dict[str, Any] = Field(default_factory=dict)  #: extra Llama(...) keyword arguments
    verbose: bool = False
    # flashmoe engine options
    device: str = "cpu"
    ram_budget: Optional[Union[int, str]] = None
    vram_budget: Optional[Union[int, str]] = None
    cache_policy: str = "lru"
    prefetch: Union[bool, str] = True

    @model_validator(mode="after")
    def _need_a_model(self):
        if self.client is None and not self.model_path:
            raise ValueError("pass model_path= (a flashmoe store, a .gguf file or 'demo') or client= (a Llama)")
        if self.grammar is not None and self.grammar_path is not None:
            raise ValueError("pass grammar= or grammar_path=, not both")
        return self

    def _llama(self):
        if self.client is None:
            from flashmoe_plugin import Llama
            self.client = Llama(model_path=self.model_path, n_ctx=self.n_ctx,
                                seed=0xFFFFFFFF if self.seed == -1 else self.seed, n_threads=self.n_threads,
                                n_batch=self.n_batch or 512, logits_all=self.logits_all,
                                last_n_tokens_size=self.last_n_tokens_size or 64, verbose=self.verbose,
                                device=self.device, ram_budget=self.ram_budget, vram_budget=self.vram_budget,
                                cache_policy=self.cache_policy, prefetch=self.prefetch, **self.model_kwargs)
        return self.client

    def _grammar(self):
        if self.grammar_path is not None:
            with open(self.grammar_path, encoding="utf-8") as f:
                return f.read()
        return self.grammar

    def _sampling(self, stop: Optional[List[str]], kwargs: dict) -> dict:
        if self.stop and stop is not None:
            raise ValueError("`stop` found in both the input and default params.")
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repeat_penalty": self.repeat_penalty, "stop": stop or self.stop or []}
        if self.seed != -1:
            params["seed"] = self.seed
        grammar = self._grammar()
        if grammar is not None:
            params["grammar"] = grammar
        params = {k: v for k, v in params.items() if v is not None}
        params.update(kwargs)
        return params

    def _model_name(self) -> str:
        if self.model_path:
            return str(self.model_path)
        return str(getattr(self.client, "model_path", "flashmoe"))


# ---------------------------------------------------------------------- text LLM
class FlashMoE(_FlashMoEBase, LLM):
    """A flashmoe model as a LangChain LLM (the counterpart of langchain-community's LlamaCpp)."""

    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    streaming: bool = True

    @property
    def _llm_type(self) -> str:
        return "flashmoe"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return {"model_path": self._model_name(), "n_ctx": self.n_ctx, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repeat_penalty": self.repeat_penalty}

    def _params(self, stop, kwargs) -> dict:
        params = self._sampling(stop, kwargs)
        for k in ("suffix", "logprobs", "echo"):
            if getattr(self, k) is not None:
                params.setdefault(k, getattr(self, k))
        return params

    def _call(self, prompt: str, stop: Optional[List[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join(c.text for c in self._stream(prompt, stop, run_manager, **kwargs))
        llama = self._llama()
        with _lock_of(llama):
            out = llama.create_completion(prompt=prompt, **self._params(stop, kwargs))
        return out["choices"][0]["text"]

    def _stream(self, prompt: str, stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        llama = self._llama()
        with _lock_of(llama):
            for part in llama.create_completion(prompt=prompt, stream=True, **self._params(stop, kwargs)):
                choice = part["choices"][0]
                chunk = GenerationChunk(text=choice["text"], generation_info={
                    "finish_reason": choice["finish_reason"], "logprobs": choice.get("logprobs")})
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk, verbose=self.verbose,
                                                 logprobs=choice.get("logprobs"))
                yield chunk

    def get_num_tokens(self, text: str) -> int:
        return len(self._llama().tokenize(text.encode("utf-8"), add_bos=False))


# ---------------------------------------------------------------------- chat model
def _text(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # carried by the message's tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"message content of type {kind!r} is not supported (text only)")
    return "".join(parts)


def _to_openai(message: BaseMessage) -> dict:
    """A LangChain message as the OpenAI-style dict the Llama's chat handler takes."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message.content)}
    if isinstance(message, HumanMessage):
        out = {"role": "user", "content": _text(message.content)}
    elif isinstance(message, AIMessage):
        out = {"role": "assistant", "content": _text(message.content)}
        if message.tool_calls:
            out["tool_calls"] = [{"id": tc.get("id") or f"call_{i}", "type": "function",
                                  "function": {"name": tc["name"], "arguments": json.dumps(tc["args"])}}
                                 for i, tc in enumerate(message.tool_calls)]
    elif isinstance(message, ToolMessage):
        content = message.content if isinstance(message.content, str) else (
            _text(message.content) if all(isinstance(b, (str, dict)) and (isinstance(b, str) or b.get("type") == "text")
                                          for b in message.content) else json.dumps(message.content))
        out = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    elif isinstance(message, FunctionMessage):
        out = {"role": "function", "content": _text(message.content), "name": message.name}
    elif isinstance(message, ChatMessage):
        out = {"role": message.role, "content": _text(message.content)}
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    if getattr(message, "name", None) and "name" not in out:
        out["name"] = message.name
    return out


def _tool_calls(raw: Optional[list]) -> tuple[list, list]:
    calls, invalid = [], []
    for tc in raw or []:
        fn = tc.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            calls.append(tool_call(name=fn.get("name", ""), args=args, id=tc.get("id")))
        except ValueError as e:
            invalid.append(invalid_tool_call(name=fn.get("name"), args=fn.get("arguments"), id=tc.get("id"),
                                             error=f"tool call arguments are not valid JSON: {e}"))
    return calls, invalid


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def _tool_choice(tool_choice, tools: list) -> Any:
    """LangChain's tool_choice spellings -> the OpenAI value the Llama takes."""
    if tool_choice is None or isinstance(tool_choice, dict):
        return tool_choice
    if tool_choice is True or tool_choice == "any":
        if len(tools) == 1:  # as ChatLlamaCpp: force that tool, one call
            return {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
        return "required"
    if tool_choice is False:
        return "none"
    if tool_choice in ("auto", "none", "required"):
        return tool_choice
    names = [t["function"]["name"] for t in tools]
    if tool_choice not in names:
        raise ValueError(f"tool_choice {tool_choice!r} names no bound tool (tools: {names})")
    return {"type": "function", "function": {"name": tool_choice}}


class ChatFlashMoE(_FlashMoEBase, BaseChatModel):
    """A flashmoe model as a LangChain chat model (the counterpart of ChatLlamaCpp), rendered
    through the model's own chat template; tools, tool_choice and response_format go to
    `Llama.create_chat_completion` unchanged."""

    streaming: bool = False
    logprobs: Optional[bool] = None

    @property
    def _llm_type(self) -> str:
        return "flashmoe-chat"

    @property
    def _identifying_params(self) -> Dict[str, Any]:
        return {"model_path": self._model_name(), "n_ctx": self.n_ctx, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repeat_penalty": self.repeat_penalty}

    def _get_ls_params(self, stop: Optional[List[str]] = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "flashmoe"
        params["ls_model_name"] = kwargs.get("model") or self._model_name()
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        stop = stop or self.stop
        if stop:
            params["ls_stop"] = stop
        return params

    def _request(self, messages: List[BaseMessage], stop, kwargs) -> dict:
        params = self._sampling(stop, kwargs)
        if self.logprobs is not None:
            params.setdefault("logprobs", self.logprobs)
        return dict(messages=[_to_openai(m) for m in messages], **params)

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream
            return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        llama = self._llama()
        with _lock_of(llama):
            out = llama.create_chat_completion(**self._request(messages, stop, kwargs))
        choice = out["choices"][0]
        msg = choice["message"]
        calls, invalid = _tool_calls(msg.get("tool_calls"))
        usage = out.get("usage") or {}
        message = AIMessage(content=msg.get("content") or "", tool_calls=calls, invalid_tool_calls=invalid,
                            id=out.get("id"),
                            usage_metadata=_usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
                            response_metadata={"finish_reason": choice.get("finish_reason"),
                                               "model_name": out.get("model"), "logprobs": choice.get("logprobs")})
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={
            "finish_reason": choice.get("finish_reason")})], llm_output={"token_usage": usage,
                                                                          "model_name": out.get("model")})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        llama = self._llama()
        request = self._request(messages, stop, kwargs)
        w = GenerationWatch()  # usage of this stream, whichever threads advance it
        with _lock_of(llama):
            with watch(into=w):
                stream = llama.create_chat_completion(stream=True, **request)
            finish, model, cid = None, None, None
            for part in watched(stream, w):
                cid, model = part.get("id"), part.get("model")
                if not part.get("choices"):
                    continue
                choice = part["choices"][0]
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason") or finish
                chunks = [tool_call_chunk(name=(tc.get("function") or {}).get("name"),
                                          args=(tc.get("function") or {}).get("arguments"),
                                          id=tc.get("id"), index=tc.get("index"))
                          for tc in delta.get("tool_calls") or []]
                content = delta.get("content") or ""
                if not content and not chunks:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=chunks, id=cid))
                if run_manager:
                    run_manager.on_llm_new_token(content, chunk=chunk)
                yield chunk
            end = w.end or {}
            last = ChatGenerationChunk(
                message=AIMessageChunk(content="", id=cid, usage_metadata=_usage(end.get("prompt_tokens", 0),
                                                                                 end.get("completion_tokens", 0)),
                                       response_metadata={"finish_reason": finish, "model_name": model}),
                generation_info={"finish_reason": finish})
            if run_manager:
                run_manager.on_llm_new_token("", chunk=last)
            yield last

    def get_num_tokens(self, text: str) -> int:
        return len(self._llama().tokenize(text.encode("utf-8"), add_bos=False))

    # ------------------------------------------------------------------ tools and structure
    def bind_tools(self, tools: Sequence[Union[Dict[str, Any], Type, Callable, BaseTool]], *,
                   tool_choice: Optional[Union[dict, str, Literal["auto", "any", "none", "required"], bool]] = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, BaseMessage]:
        """Bind tools (OpenAI tool dicts, pydantic classes, functions or BaseTools); tool_choice
        "auto" | "required" | "none" | a tool's name | "any"/True ("required"; with one tool, that
        tool, as ChatLlamaCpp does)."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = _tool_choice(tool_choice, formatted)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: Optional[Union[Dict, Type]] = None, *, include_raw: bool = False,
                               method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
                               **kwargs: Any) -> Runnable[LanguageModelInput, Union[Dict, BaseModel]]:
        """Output shaped by `schema` (a pydantic class, TypedDict or JSON schema): "function_calling"
        forces a call of a tool made from the schema; "json_schema" constrains the reply to the
        schema (response_format); "json_mode" asks for any JSON object."""
        kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            if schema is None:
                raise ValueError("schema must be given for method='function_calling'")
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": tool})
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_schema":
            if schema is None:
                raise ValueError("schema must be given for method='json_schema'")
            tool = convert_to_openai_tool(schema)["function"]
            json_schema = schema.model_json_schema() if is_pydantic else tool.get("parameters", schema)
            response_format = {"type": "json_schema", "json_schema": {"name": tool["name"], "schema": json_schema,
                                                                      "strict": True}}
            llm = self.bind(response_format=response_format, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": convert_to_openai_tool(schema)})
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        elif method == "json_mode":
            llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format={
                "kwargs": {"method": method}, "schema": schema})
            parser = (PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser())
        else:
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', not {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
