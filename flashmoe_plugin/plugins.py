"""PluginManager: built-ins and third-party plugins both come from the entry-point group
"flashmoe" (built-ins are also registered directly so a source checkout works uninstalled)."""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

# Same names as the entry points in pyproject.toml, so loading those skips what is already here.
BUILTINS = {
    "mixtral": "flashmoe_plugin.models.mixtral",
    "qwen2_moe": "flashmoe_plugin.models.qwen2_moe",
    "qwen3_moe": "flashmoe_plugin.models.qwen3_moe",
    "olmoe": "flashmoe_plugin.models.olmoe",
    "torch_backend": "flashmoe_plugin.kernels.torch_backend",
    "native_backends": "flashmoe_plugin.kernels.native_backends",
    "policies": "flashmoe_plugin.pager.policies",
    "storage": "flashmoe_plugin.pager.faulty",
    "core_commands": "flashmoe_plugin.commands",
    "bench_commands": "flashmoe_plugin.bench.commands",
}


@functools.lru_cache(maxsize=None)
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("flashmoe")
    pm.add_hookspecs(hookspecs)
    for name, module in BUILTINS.items():
        pm.register(importlib.import_module(module), name)
    pm.load_setuptools_entrypoints("flashmoe")
    return pm


def _unique(kind: str, store: dict, key: str, value):
    if key in store and store[key] is not value:
        raise ValueError(f"two plugins register the {kind} {key!r}")
    store[key] = value


@dataclass
class Registry:
    architectures: dict = field(default_factory=dict)
    backends: dict = field(default_factory=dict)
    policies: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def registry() -> Registry:
    pm, r = manager(), Registry()

    def arch(a):
        for n in a.names:
            _unique("architecture", r.architectures, n, a)

    pm.hook.register_architectures(register=arch)
    pm.hook.register_backends(register=lambda b: _unique("backend", r.backends, b.name, b))
    pm.hook.register_cache_policies(register=lambda n, f: _unique("cache policy", r.policies, n, f))
    pm.hook.register_storage(register=lambda n, f: _unique("storage reader", r.storage, n, f))
    return r
