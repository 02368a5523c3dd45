"""`python -m capline ...` is the `capline` command (torchrun launches it this way)."""

from capline.cli import cli_main

cli_main()
