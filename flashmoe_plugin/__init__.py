"""flashmoe-plugin: run Mixture-of-Experts LLMs larger than memory by paging experts from SSD."""
import os as _os

__version__ = "0.1.0"

# torch's OpenMP workers spin after every op (libgomp's default wait policy) on the cores that the
# native kernels' threads need: on 2 cores the demo model decoded at ~40 tok/s with them spinning
# and ~120 with them asleep, a Mixtral layer's compute took 24% longer (benchmarks/README.md,
# issue 10). libgomp reads this when torch loads it, so it applies when flashmoe_plugin is
# imported before torch; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    # Lazy so that `import flashmoe_plugin` stays cheap and the adapter imports the core, not back.
    if name == "Llama":
        from .adapters.llama_cpp import Llama
        return Llama
    if name == "demo_model_path":
        from .demo import demo_model_path
        return demo_model_path
    raise AttributeError(name)
