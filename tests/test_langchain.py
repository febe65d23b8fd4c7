"""LangChain classes over the demo model: what they return is what the same `Llama` returns, and
langchain-tests' standard unit tests for chat models pass for ChatFlashMoE."""
import asyncio

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

from flashmoe_plugin import Llama
from flashmoe_plugin.adapters.langchain import ChatFlashMoE, FlashMoE


@pytest.fixture(scope="module")
def llama():
    llm = Llama(model_path="demo", n_ctx=512, verbose=False)
    yield llm
    llm.close()


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_llm_invoke_stream_stop_callbacks(llama):
    llm = FlashMoE(client=llama, max_tokens=12, temperature=0, streaming=False)
    want = llama.create_completion("The history of the city", max_tokens=12, temperature=0, top_p=0.95, top_k=40,
                                   repeat_penalty=1.1)["choices"][0]["text"]
    assert llm.invoke("The history of the city") == want and want
    cb = Tokens()
    assert "".join(llm.stream("The history of the city", config={"callbacks": [cb]})) == want
    assert "".join(cb.tokens) == want and len(cb.tokens) > 1
    word = want.split()[1]
    stopped = llm.invoke("The history of the city", stop=[word])
    assert stopped == want[: want.index(word)]


def test_chat_invoke_usage_stream(llama):
    chat = ChatFlashMoE(client=llama, max_tokens=12, temperature=0)
    messages = [SystemMessage("You answer briefly."), HumanMessage("Where is the city?")]
    want = llama.create_chat_completion(
        messages=[{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is the city?"}],
        max_tokens=12, temperature=0, top_p=0.95, top_k=40, repeat_penalty=1.1)
    out = chat.invoke(messages)
    assert isinstance(out, AIMessage) and out.content == want["choices"][0]["message"]["content"]
    u = want["usage"]
    assert out.usage_metadata == {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                                  "total_tokens": u["total_tokens"]}
    assert out.response_metadata["finish_reason"] == want["choices"][0]["finish_reason"]
    cb = Tokens()
    chunks = list(chat.stream(messages, config={"callbacks": [cb]}))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.content == out.content and "".join(cb.tokens) == out.content
    assert total.usage_metadata == out.usage_metadata

    async def astream():  # LangChain advances a sync stream from executor threads here
        parts = [c async for c in chat.astream(messages)]
        agg = parts[0]
        for c in parts[1:]:
            agg += c
        return agg
    agg = asyncio.run(astream())
    assert agg.content == out.content and agg.usage_metadata == out.usage_metadata
    assert ChatFlashMoE(client=llama, max_tokens=12, temperature=0, streaming=True).invoke(messages).content == out.content


def test_parameters_and_lazy_loading():
    # LlamaCpp / ChatLlamaCpp names with the same meaning
    for name in ("client", "model_path", "n_ctx", "seed", "n_threads", "n_batch", "max_tokens", "temperature",
                 "top_p", "top_k", "repeat_penalty", "stop", "grammar", "grammar_path", "model_kwargs", "streaming",
                 "verbose", "last_n_tokens_size", "logits_all"):
        assert name in ChatFlashMoE.model_fields and name in FlashMoE.model_fields, name
    chat = ChatFlashMoE(model_path="/no/such/store")  # nothing loads before the first call
    with pytest.raises(ValueError, match="/no/such/store"):
        chat.invoke("hi")
    with pytest.raises(ValueError, match="model_path"):
        ChatFlashMoE()


class Weather(BaseModel):
    """The weather in a city."""
    city: str = Field(description="the city", max_length=20)  # bounded: a tiny model rambles


def test_bind_tools_required_returns_a_parsed_call(llama):
    chat = ChatFlashMoE(client=llama, max_tokens=64, temperature=0)
    out = chat.bind_tools([Weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert len(out.tool_calls) >= 1 and out.tool_calls[0]["name"] == "Weather"
    assert isinstance(out.tool_calls[0]["args"]["city"], str) and out.tool_calls[0]["id"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llama, method):
    chat = ChatFlashMoE(client=llama, max_tokens=64, temperature=0)
    out = chat.with_structured_output(Weather, method=method).invoke("What is the weather in Paris?")
    assert isinstance(out, Weather) and isinstance(out.city, str)
    raw = chat.with_structured_output(Weather.model_json_schema(), method=method, include_raw=True).invoke("Paris?")
    assert isinstance(raw["raw"], AIMessage) and raw["parsing_error"] is None and isinstance(raw["parsed"]["city"], str)


class TestChatFlashMoEStandard(ChatModelUnitTests):
    """langchain-tests' standard unit tests (no generation: the model loads lazily)."""

    @property
    def chat_model_class(self):
        return ChatFlashMoE

    @property
    def chat_model_params(self):
        return {"model_path": "demo", "temperature": 0}

    @property
    def has_tool_calling(self):
        return True

    @property
    def has_tool_choice(self):
        return True

    @property
    def has_structured_output(self):
        return True

    @property
    def returns_usage_metadata(self):
        return True
