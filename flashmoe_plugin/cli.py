"""`flashmoe`: the root command. Its subcommands come from plugins (register_commands), the
built-in ones included (commands.py)."""
from __future__ import annotations

import sys
import warnings

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flashmoe")
def cli():
    """Run Mixture-of-Experts LLMs larger than memory: experts stream from an SSD store through a
    tiered, predictive pager and run on fused quantized kernels."""


def _notice(message, category, filename, lineno, file=None, line=None):
    """Warnings from the core reach a CLI user as one line, without a file and line number."""
    kind = "note" if category is UserWarning else category.__name__
    print(f"flashmoe: {kind}: {message}", file=file or sys.stderr)


def main():
    from .plugins import manager
    warnings.showwarning = _notice
    manager().hook.register_commands(cli=cli)
    cli()
