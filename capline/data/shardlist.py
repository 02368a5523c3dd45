"""Shard patterns: what a `data.*_shards` setting names, and the error for a data setting that cannot work.

Kept apart from the DataModule so that `capline shards` reads shards without loading Lightning.
"""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

__all__ = ["DataConfigError", "expand_shards"]


class DataConfigError(ValueError):
    """A data setting that cannot work (no matching shards, indivisible batch size...)."""


def expand_shards(pattern: str | list[str], name: str) -> list[str]:
    """Expands brace patterns; local shards must exist, remote URLs are left to webdataset to open."""
    urls = wds.shardlists.expand_urls(pattern) if isinstance(pattern, str) else list(pattern)
    local = [u for u in urls if "://" not in u or u.startswith("file://")]
    missing = [u for u in local if not Path(u.removeprefix("file://")).is_file()]
    if urls and len(missing) == len(urls):
        raise DataConfigError(f"data.{name} pattern {pattern!r} matches no file")
    if missing:
        raise DataConfigError(f"data.{name}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]!r}")
    return urls
