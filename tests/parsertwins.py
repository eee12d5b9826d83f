"""What the request and response parser tests share: bytes fed piece by piece, how feeding
ended, the calls a sink recorded with body pieces merged, and the ways to cut the bytes."""

from __future__ import annotations

from typing import Any

import httptools


def feed(parser: Any, pieces: list[bytes]) -> Any:
    """Feed `pieces` one by one; how feeding ended: None, ("upgrade", piece index, offset) or
    ("error", class name, message, the context's class and message)."""
    for i, piece in enumerate(pieces):
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade as up:
            return ("upgrade", i, up.args[0])
        except httptools.HttpParserError as exc:
            ctx = exc.__context__
            return ("error", type(exc).__name__, str(exc),
                    None if ctx is None else (type(ctx).__name__, str(ctx)))
    return None


def merged(calls: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The calls with adjacent body pieces joined: how llhttp cuts a body follows the reads."""
    out: list[tuple[Any, ...]] = []
    for call in calls:
        if call[0] == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + call[1])
        else:
            out.append(call)
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """Whole, byte by byte, and cut in two at every place."""
    out = [[data], [data[i:i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    return out
