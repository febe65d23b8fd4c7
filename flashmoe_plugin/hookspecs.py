"""The plugin contract (pluggy project "flashmoe"). Built-ins implement these hooks exactly like
third-party plugins do; see plugins.py for how they are loaded."""
import pluggy

hookspec = pluggy.HookspecMarker("flashmoe")
hookimpl = pluggy.HookimplMarker("flashmoe")


@hookspec
def register_architectures(register):
    """Call register(arch) for each models.base.Architecture this plugin provides."""


@hookspec
def register_backends(register):
    """Call register(backend) for each kernels.base.Backend this plugin provides."""


@hookspec
def register_cache_policies(register):
    """Call register(name, factory) for each pager cache policy; factory(capacity) -> Policy."""


@hookspec
def register_storage(register):
    """Call register(name, reader_factory) for each way of reading expert records.
    reader_factory(nthreads=, direct=, **storage_options) returns an object with io.Reader's
    interface (open, submit -> ticket with wait/done/cancel, read, close); the pager picks one by
    name (Engine(storage=...), `--storage`). Built in: `native`, `faulty` (pager/faulty.py)."""


@hookspec
def register_commands(cli):
    """Add click commands to the `flashmoe` group."""


@hookspec
def on_token(stats):
    """Called after each generated token with a dict of pager/engine statistics."""


@hookspec
def on_generation_end(stats):
    """Called once per generation with the totals."""
