"""Structured output and tool calls with flashmoe's llama-cpp-python drop-in.

    python examples/structured_output.py [MODEL]     # MODEL: a store folder, a .gguf, or "demo"

The demo model is tiny and knows little: it follows the grammar, not the question. A real model
(Qwen3-30B-A3B, Mixtral, ...) gives sensible values in the same shapes.
"""
import json
import sys

from flashmoe_plugin import Llama
from flashmoe_plugin.runtime.constraints import Grammar

llm = Llama(model_path=sys.argv[1] if len(sys.argv) > 1 else "demo", n_ctx=1024, verbose=False)

# 1. JSON that matches a schema (OpenAI's response_format).
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}
fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
out = llm.create_chat_completion([{"role": "user", "content": "Invent a person."}], max_tokens=64, seed=1,
                                 response_format=fmt)
print("json_schema:", json.loads(out["choices"][0]["message"]["content"]))

# 2. A llama.cpp GBNF grammar (a string, or llama_cpp.LlamaGrammar.from_file("grammars/json.gbnf")).
yes_no = 'root ::= ("yes" | "no") "."'
print("gbnf:", llm("Is the sky blue? Answer:", grammar=yes_no, max_tokens=4)["choices"][0]["text"])

# 3. A regex.
print("regex:", llm("A date:", grammar=Grammar.regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"), max_tokens=12)
      ["choices"][0]["text"])

# 4. A tool call, through the model's own chat template; tool_choice names the function.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                         "required": ["city"]}}}]
out = llm.create_chat_completion([{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=64,
                                 tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1)
for call in out["choices"][0]["message"]["tool_calls"]:
    print("tool call:", call["function"]["name"], json.loads(call["function"]["arguments"]))
