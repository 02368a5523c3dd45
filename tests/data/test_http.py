"""`HTTPShardStream` against a real server on 127.0.0.1 (`tests/flaky_server.py`): whole bytes whatever the faults,
or one error naming the URL in bounded time."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_flaky_http import serve  # noqa: E402

from capline.data.http import HTTPOptions, HTTPShardStream, ShardReadError  # noqa: E402

FAST = HTTPOptions(retries=3, backoff_s=0.05, stall_s=0.5)


@pytest.fixture
def shard(tmp_path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.tar").write_bytes(os.urandom(200_000))
    return folder


@pytest.mark.parametrize(
    "plan",
    [["ok"], ["503", "503", "ok"], ["drop:1000", "drop:70000"], ["stall:5000:3"], ["drop:100", "503", "stall:9000:3"]],
)
def test_the_shard_arrives_whole_whatever_the_faults(shard, tmp_path, plan):
    server, base = serve(shard, {"a.tar": plan}, tmp_path)
    try:
        with HTTPShardStream(f"{base}/a.tar", FAST) as stream:
            data = stream.read()
    finally:
        server.kill()
    assert data == (shard / "a.tar").read_bytes()
    resumed = [line for line in (shard / "requests.log").read_text().splitlines() if "bytes=" in line]
    assert stream.reconnects == sum(1 for action in plan if action.startswith(("drop", "stall")))
    assert all(int(line.split("bytes=")[1].split("-")[0]) > 0 for line in resumed)  # never from byte 0 again


@pytest.mark.parametrize(("plan", "why"), [(["stall:0:30"] * 9, "no data for the stall timeout"),
                                           (["503"] * 9, "HTTP 503"), (["404"], "HTTP 404")])  # fmt: skip
def test_a_shard_that_never_comes_fails_in_bounded_time_naming_the_url(shard, tmp_path, plan, why):
    server, base = serve(shard, {"a.tar": plan}, tmp_path)
    url = f"{base}/a.tar" if plan != ["404"] else f"{base}/missing.tar"
    started = time.monotonic()
    try:
        with pytest.raises(ShardReadError) as err:
            with HTTPShardStream(url, FAST) as stream:
                stream.read()
    finally:
        server.kill()
    assert time.monotonic() - started < 10
    assert str(err.value).startswith(url) and why in str(err.value)
