"""Shards over HTTP(S) that survive a flaky server: resumed where a connection broke, retried with back-off, never
stalled forever.

webdataset opens `http(s)://` shards with `curl --retry 30 --retry-delay 2`, which retries a 503 but not a
connection dropped in the middle of a tar (curl's retry would send the bytes again from the start into the same
pipe), and waits forever on a server that stops sending. `HTTPShardStream` reads one shard as one stream: a dropped
or stalled connection is reopened at the byte where it broke (an HTTP `Range` request, which every object store
and web server answers), answers 408/425/429/5xx and refused connections are retried after 1, 2, 4, ... seconds,
and a read that gets no byte for `stall_s` seconds counts as a broken connection. When the retries run out it
raises `ShardReadError` naming the URL; the stream then counts the shard as a `broken_shard` and goes on.
"""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class HTTPOptions:
    """How `http(s)://` shards are read (`data.http` in a config)."""

    retries: int = 5  # attempts after a failure (a drop, a stall, a 5xx answer) before the shard counts as broken
    backoff_s: float = 1.0  # wait before the first retry, doubled for each next one
    stall_s: float = 60.0  # a read that gets no byte for this long is a broken connection (retried)


# What the CaptionDataModule was configured with (`data.http`), for the readers it does not hand options to (layout
# detection, reference reading); the streams carry their own copy into the dataloader workers.
default_options = HTTPOptions()


class ShardReadError(OSError):
    """A remote shard that could not be read to its end, after every retry."""


class HTTPShardStream(io.RawIOBase):
    """A readable binary stream of one HTTP(S) shard, resumed and retried as the module docstring says."""

    def __init__(self, url: str, options: HTTPOptions | None = None):
        super().__init__()
        self.url, self.options = url, options or default_options
        self.position = 0  # bytes delivered so far
        self.length: int | None = None  # the shard's size, once a response has told it
        self.reconnects = 0  # how many times a broken read was resumed (for tests and logs)
        self._response: http.client.HTTPResponse | None = None
        self._response = self._open(first=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            try:
                data = self._response.read1(len(buffer))  # what has arrived: a stall loses none of it
                count = len(data)
                buffer[:count] = data
                if count or self.length is None or self.position >= self.length:
                    self.position += count
                    return count
                problem: Exception = ConnectionError(f"the connection closed at byte {self.position} of {self.length}")
            except (OSError, http.client.HTTPException) as err:  # a reset, an incomplete read, a socket timeout
                problem = err
            failures += 1
            if failures > self.options.retries:
                raise ShardReadError(f"{self.url}: reading stopped at byte {self.position} ({_why(problem)}) and "
                                     f"{self.options.retries} retries did not resume it")  # fmt: skip
            log.info("%s: %s at byte %d; resuming there", self.url, _why(problem), self.position)
            self._close_response()
            time.sleep(self.options.backoff_s * 2 ** (failures - 1))
            self._response = self._open(first=False)
            self.reconnects += 1

    def close(self) -> None:
        self._close_response()
        super().close()

    def _close_response(self) -> None:
        if self._response is not None:
            try:
                self._response.close()
            except OSError:
                pass
            self._response = None

    def _open(self, first: bool) -> http.client.HTTPResponse:
        """A response delivering the shard from `self.position` on, after retrying what can be retried."""
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        for attempt in range(self.options.retries + 1):
            try:
                request = urllib.request.Request(self.url, headers=headers)
                response = urllib.request.urlopen(request, timeout=self.options.stall_s)
                if self.position and response.status != 206:  # the server ignored the range: skip what was read
                    _discard(response, self.position)
                self._learn_length(response)
                return response
            except urllib.error.HTTPError as err:
                retry = err.code in _RETRY_STATUS
                problem: Exception = err
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out
                retry, problem = True, err
            if not retry or attempt == self.options.retries:
                when = "" if first else f" (resuming at byte {self.position})"
                raise ShardReadError(f"{self.url}: {_why(problem)}{when}, after {attempt + 1} attempt(s)")
            log.info("%s: %s; retrying in %.0f s", self.url, _why(problem), self.options.backoff_s * 2**attempt)
            time.sleep(self.options.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _learn_length(self, response: http.client.HTTPResponse) -> None:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit():
            self.length = int(total)
        elif response.headers.get("Content-Length", "").isdigit() and response.status == 200:
            self.length = int(response.headers["Content-Length"])


def _discard(response: http.client.HTTPResponse, count: int) -> None:
    while count > 0:
        chunk = response.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed before the resume point")
        count -= len(chunk)


def _why(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return "no data for the stall timeout (data.http.stall_s)"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))
