"""`capline` subcommands besides Lightning's fit/validate/test/predict; each is also `python -m capline.commands.X`."""

from __future__ import annotations

import importlib

# name -> (module, one line for `capline --help`)
COMMANDS = {
    "configs": ("configs", "list the shipped configs, or print one (`capline configs demo > my.yaml`)"),
    "shards": ("shards", "write WebDataset shards: coco, flickr, karpathy, synthetic; vocab and index of any shards"),
    "caption": ("caption", "caption image files with a checkpoint (text, JSON, or captioned images)"),
    "evaluate": ("evaluate", "official COCO caption metrics of a results file"),
    "scene-check": ("scene_check", "how many of a demo checkpoint's captions of unseen scenes are true"),
}


def run(name: str, argv: list[str]) -> int:
    """Runs subcommand `name` with its arguments; returns its exit status."""
    module = importlib.import_module(f"capline.commands.{COMMANDS[name][0]}")
    return module.main(argv)


def help_lines() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {name:{width}s}  {line}" for name, (_, line) in COMMANDS.items())
