"""The configs that ship inside the package (`capline/configs/*.yaml`), addressable by name without a clone.

`capline fit --config demo` is `capline fit --config <site-packages>/capline/configs/demo.yaml`; a value that names
an existing file (`configs/demo.yaml` in a clone, a user's own YAML) is left as it is, and so is inline YAML.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """Every shipped config by name (the file name without `.yaml`), sorted."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """The path `--config value` stands for: an existing file, else a shipped config's name (with or without
    `.yaml`, with or without a leading `configs/`), else `value` unchanged (jsonargparse then reads it)."""
    if Path(value).is_file():
        return value
    name = Path(value).name.removesuffix(".yaml").removesuffix(".yml")
    parent = Path(value).parent
    found = packaged_configs().get(name)
    if found is not None and str(parent) in (".", "configs"):
        return str(found)
    return value


def expand_config_args(argv: list[str]) -> list[str]:
    """`argv` with each `--config NAME` / `--config=NAME` resolved by `resolve_config`."""
    out, follows = [], False
    for arg in argv:
        if follows:
            out.append(resolve_config(arg))
            follows = False
        elif arg == "--config":
            out.append(arg)
            follows = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out


def describe(path: Path) -> str:
    """A config's first comment line (what it is for), or ""."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
