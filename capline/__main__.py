"""`python -m capline ...` is the `capline` command (torchrun launches it this way)."""

from capline.entry import main

main()
