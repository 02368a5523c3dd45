"""Small helpers for turning exceptions into the one-sentence messages capline prints."""

from __future__ import annotations

from collections.abc import Iterator


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def causes(err: BaseException | None, depth: int = 8) -> Iterator[BaseException]:
    """`err`, then what it was raised from or while handling, up to `depth` links (libraries often wrap an OSError
    in their own error: torch.save's failed write, tarfile's read of a stream)."""
    for _ in range(depth):
        if err is None:
            return
        yield err
        err = err.__cause__ or err.__context__
