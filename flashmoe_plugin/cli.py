"""`flashmoe`: the root command. Its subcommands come from plugins (register_commands), the
built-in ones included (commands.py)."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flashmoe")
def cli():
    """Run Mixture-of-Experts LLMs larger than memory: experts stream from an SSD store through a
    tiered, predictive pager and run on fused quantized kernels."""


def main():
    from .plugins import manager
    manager().hook.register_commands(cli=cli)
    cli()
