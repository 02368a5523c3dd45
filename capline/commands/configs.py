"""Lists the configs shipped with capline, or prints one (to copy and edit).

    capline configs                  # name, path and purpose of each
    capline configs demo > my.yaml   # the demo config's YAML; then: capline fit --config my.yaml

Any `--config NAME` of `capline fit/validate/test/predict` takes these names (`--config demo`).
"""

from __future__ import annotations

import argparse
import sys

from capline.config_files import describe, packaged_configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capline configs", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="print this config's YAML instead of the list")
    args = parser.parse_args(argv)
    configs = packaged_configs()
    if args.name is not None:
        name = args.name.removesuffix(".yaml")
        if name not in configs:
            print(f"capline configs: error: no config named {args.name!r}; there are: {', '.join(configs)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        sys.stdout.write(configs[name].read_text())
        return 0
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:{width}s}  {describe(path)}\n{'':{width}s}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
