"""Wire format between the host and the sandbox, shared by both sides.

Standard library only: the worker imports this file by path inside the sandbox, where the
project's packages are not visible.

Frames are a 4-byte big-endian length followed by UTF-8 JSON. Values crossing the boundary use
a strict tagged encoding: only exact builtin types (``type(v) is int``, not subclasses) are
accepted, so an object with a rigged ``__eq__`` can never reach the host's comparison; the host
decodes into fresh builtin objects before comparing.
"""

from __future__ import annotations

import json
import math
import os
import struct

MAX_FRAME = 64 * 1024 * 1024
MAX_DEPTH = 64
_HEADER = struct.Struct(">I")


class Unencodable(TypeError):
    """A value the program returned is not plain data."""


class ProtocolError(ValueError):
    """A frame or encoded value is malformed (or forged)."""


def encode(value: object, depth: int = 0) -> object:
    """Encode plain Python data into JSON-safe form, rejecting every non-builtin type."""
    if depth > MAX_DEPTH:
        raise Unencodable("value nested too deeply")
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return value if math.isfinite(value) else {"$f": repr(value)}
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"$t": [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"$d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is set or t is frozenset:
        return {"$s" if t is set else "$fs": [encode(v, depth + 1) for v in value]}
    if t is bytes:
        return {"$b": value.decode("latin-1")}
    if t is complex:
        return {"$c": [encode(value.real, depth + 1), encode(value.imag, depth + 1)]}
    raise Unencodable(f"unsupported type {t.__module__}.{t.__qualname__}")


def decode(data: object, depth: int = 0) -> object:
    """Rebuild builtin objects from :func:`encode` output; anything else is a ProtocolError."""
    if depth > MAX_DEPTH:
        raise ProtocolError("value nested too deeply")
    t = type(data)
    if data is None or t in (bool, int, str, float):
        return data
    if t is list:
        return [decode(v, depth + 1) for v in data]
    if t is not dict or len(data) != 1:
        raise ProtocolError(f"malformed encoded value of type {t.__name__}")
    (tag, body), = data.items()
    if tag == "$f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "$b" and type(body) is str:
        return body.encode("latin-1")
    if type(body) is not list:
        raise ProtocolError(f"malformed encoded value with tag {tag!r}")
    items = [decode(v, depth + 1) for v in body]
    try:
        if tag == "$t":
            return tuple(items)
        if tag == "$s":
            return set(items)
        if tag == "$fs":
            return frozenset(items)
        if tag == "$c" and len(items) == 2:
            return complex(items[0], items[1])
        if tag == "$d" and all(type(p) is list and len(p) == 2 for p in items):
            return {k: v for k, v in items}
    except TypeError as exc:  # unhashable set member or dict key
        raise ProtocolError(str(exc)) from exc
    raise ProtocolError(f"unknown tag {tag!r}")


def pack(obj: object) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return _HEADER.pack(len(data)) + data


def write_frame(fd: int, obj: object) -> None:
    view = memoryview(pack(obj))
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_size: int = MAX_FRAME) -> object | None:
    """Read one frame with blocking reads; ``None`` at end of stream."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if n > max_size:
        raise ProtocolError(f"frame of {n} bytes exceeds {max_size}")
    body = _read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body)


class FrameBuffer:
    """Incremental frame parser for non-blocking readers."""

    def __init__(self, max_size: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> list[object]:
        self.buf += data
        frames = []
        while len(self.buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self.buf)
            if n > self.max_size:
                raise ProtocolError(f"frame of {n} bytes exceeds {self.max_size}")
            if len(self.buf) < _HEADER.size + n:
                break
            body = bytes(self.buf[_HEADER.size:_HEADER.size + n])
            del self.buf[:_HEADER.size + n]
            try:
                frames.append(json.loads(body))
            except ValueError as exc:
                raise ProtocolError(f"frame is not JSON: {exc}") from exc
        return frames
