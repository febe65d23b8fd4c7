"""What "a model" names, in one place: every command that takes a model (run, bench, profile,
inspect, ...), Engine and Llama(model_path=...) resolve it here.

    resolve_model("demo")           # the embedded demo store (unless ./demo exists)
    resolve_model("./mixtral-q4")   # a store folder, a .gguf file (store/model.py opens either)

A name that does not exist is a ValueError that says what a model can be.
"""
from __future__ import annotations

from pathlib import Path

import click

DEMO = "demo"


def resolve_model(name) -> Path:
    """The path a model name stands for: `demo` is the embedded model (a file or folder called
    demo in the working directory wins, as llama-cpp-python would open it), else the path itself."""
    path = Path(name)
    if str(name) == DEMO and not path.exists():
        from .demo import demo_model_path
        return demo_model_path()
    if not path.exists():
        raise ValueError(f"{name}: no such model (a store folder written by `flashmoe convert` or "
                         f"`flashmoe synth`, a .gguf file, or `{DEMO}` for the embedded model)")
    return path


class ModelType(click.ParamType):
    """A click argument type: a model name resolved to its path at parse time (a one-line usage
    error when there is none)."""
    name = "model"

    def convert(self, value, param, ctx):
        try:
            return resolve_model(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


MODEL = ModelType()
