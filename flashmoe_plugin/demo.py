"""The embedded default model: a small MoE trained by the project (examples/train_demo_model),
shipped as a q4 store inside the package so `flashmoe demo` works offline on a fresh machine."""
from __future__ import annotations

from pathlib import Path

DEMO_PROMPT = "The history of the city begins"


def demo_model_path() -> Path:
    path = Path(__file__).parent / "demo_model" / "store"
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: the demo store is not in this installation")
    return path
