"""Run flashmoe's CLI with the decode step's functions taken from another checkout's
runtime/decode_ops.py (e.g. main's), to time two versions of those functions on one machine:

    python3 benchmarks/decode_ops_variant.py PATH/TO/decode_ops.py bench STORE --device cuda --json ...

Every name in Ops.NAMES (and anything they call) then comes from that file; the rest of the
package is this tree's."""
import importlib.util
import inspect
import sys

from flashmoe_plugin.runtime import decode_ops

path = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("flashmoe_plugin.runtime._other_decode_ops", path)
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)


def _without_fold(f):
    """An older file's function takes no `fold` (kernels/decode_fuse.py's folds, passed by the step)."""
    if "fold" in inspect.signature(f).parameters:
        return f
    return lambda *args, fold=0, **kw: f(*args, **kw)


for name in decode_ops.Ops.NAMES:
    setattr(decode_ops, name, _without_fold(getattr(other, name)))
print(f"# decode_ops functions {', '.join(decode_ops.Ops.NAMES)} from {path}", file=sys.stderr)

from flashmoe_plugin.cli import main  # noqa: E402

sys.argv[0] = "flashmoe"
main()
