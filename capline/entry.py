"""The `capline` command: capline's own subcommands (`capline.commands`) start without importing Lightning or
torch; `fit`, `validate`, `test` and `predict` go to the LightningCLI of `capline.cli`."""

from __future__ import annotations

import sys

from capline import commands
from capline.config_files import packaged_configs


def print_help() -> None:
    """Lightning's usage of fit/validate/test/predict, then capline's own subcommands and configs."""
    from capline.cli import cli_main

    sys.argv[1:] = ["--help"]
    try:
        cli_main()
    except SystemExit:
        pass
    print(f"\nmore subcommands (each with --help):\n{commands.help_lines()}")
    print("shipped configs (`--config NAME`, listed by `capline configs`): " + ", ".join(packaged_configs()))


def main() -> None:
    argv = sys.argv[1:]
    try:
        if argv[:1] and argv[0] in commands.COMMANDS:
            sys.exit(commands.run(argv[0], argv[1:]))
        if not argv or argv[0] in ("-h", "--help"):
            print_help()
            return
        from capline.cli import cli_main

        cli_main()
    except BrokenPipeError:  # `capline configs | head`: the reader left; nothing more to say
        sys.stderr.close()
        sys.exit(0)
