"""flashmoe-plugin: run Mixture-of-Experts LLMs larger than memory by paging experts from SSD."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import flashmoe_plugin` stays cheap and the adapter imports the core, not back.
    if name == "Llama":
        from .adapters.llama_cpp import Llama
        return Llama
    if name == "demo_model_path":
        from .demo import demo_model_path
        return demo_model_path
    raise AttributeError(name)
