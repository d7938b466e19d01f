"""Chrome / PyTorch-profiler trace JSON, read as a stream of events.

A profiler trace of a real model is hundreds of MB; ``json.load`` of one builds every event
(CPU ops, runtime calls, flow arrows) as Python objects at once, several GB. Calibration needs
a few fields of the device kernels only, so :func:`iter_events` decodes the file one event at a
time from a sliding text window and the caller keeps what it needs. Plain or gzip files; the
inflated size of a gzip is capped (``max_bytes``) so a small hostile file cannot fill memory.

Errors are :class:`~overlap.errors.ConfigError` naming the file: not JSON, truncated, nested too
deeply, an event too large, over the size cap.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from overlap.errors import ConfigError

MAX_BYTES = 2 << 30  # 2 GiB of (inflated) trace text: ten times the largest profile seen
MAX_RATIO = 200  # gzip of trace JSON is ~10-30x; 300 KB that inflates to 600 MB is a bomb
RATIO_FREE = 64 << 20  # the ratio is only checked past this much text
MAX_EVENT_BYTES = 16 << 20  # one event: a kernel event is ~1 KB
CHUNK = 1 << 20
_NON_WS = re.compile(r"[^ \t\n\r]")
_decoder = json.JSONDecoder()


class _Capped:
    """Bytes of a file, inflated if gzipped, refusing to produce more than ``limit`` bytes or,
    past the first ``RATIO_FREE`` bytes, more than ``MAX_RATIO`` times the compressed size."""

    def __init__(self, handle: BinaryIO, path: Any, limit: int) -> None:
        self.handle, self.path, self.limit = handle, path, limit
        self.total = self.compressed = 0
        head = handle.read(2)
        self.gzipped = head == b"\x1f\x8b"
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzipped else None
        self.tail = head if self.gzipped else b""  # raw bytes not yet inflated
        self.pending = b"" if self.gzipped else head

    def read(self, size: int = CHUNK) -> bytes:
        out, self.pending = self.pending, b""
        while not out:
            if self.inflate is None:
                out = self.handle.read(size)
                if not out:
                    return b""
                break
            if not self.tail:
                self.tail = self.handle.read(size)
                self.compressed += len(self.tail)
                if not self.tail:
                    if not self.inflate.eof:
                        raise ConfigError(f"'{self.path}' is a truncated gzip file")
                    return b""
            out = self._inflate(size)
        self.total += len(out)
        if self.total > self.limit:
            what = "inflates to" if self.gzipped else "is"
            raise ConfigError(f"'{self.path}' {what} more than {self.limit / 2**20:.0f} MiB of trace "
                              "text; the limit guards against decompression bombs (pass a larger "
                              "max_bytes if the trace is genuine)")
        if self.gzipped and self.total > RATIO_FREE and self.total > MAX_RATIO * self.compressed:
            raise ConfigError(f"'{self.path}' inflates more than {MAX_RATIO}x ({self.compressed} "
                              f"compressed bytes gave {self.total}): refused as a decompression "
                              "bomb; a real profiler trace compresses about 10-30x")
        return out

    def _inflate(self, size: int) -> bytes:
        # At most ``size`` bytes per call: a bomb never inflates far past a cap in one step.
        try:
            if self.inflate.eof:  # a further gzip member follows
                self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = self.inflate.decompress(self.tail, size)
        except zlib.error as exc:
            raise ConfigError(f"'{self.path}' looks gzipped but cannot be decompressed: {exc}") from None
        self.tail = self.inflate.unconsumed_tail or self.inflate.unused_data
        return out


class _Text:
    """A sliding window of decoded text over a capped byte stream."""

    def __init__(self, raw: _Capped, path: Any) -> None:
        self.raw, self.path = raw, path
        self.decode = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof = "", 0, False
        self.lines = 0  # newlines in the text already dropped from the window

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.raw.read()
        try:
            text = self.decode.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            at = self.raw.total - len(data) + exc.start
            raise ConfigError(f"'{self.path}' is not UTF-8 text (byte {at})") from None
        if not data:
            self.eof = True
        if self.pos > CHUNK:  # drop what was consumed so the window stays small
            self.lines += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += text
        return bool(data) or bool(text)

    def peek(self) -> str:
        """The next non-space character ("" at the end), without consuming it."""
        while True:
            found = _NON_WS.search(self.buf, self.pos)
            if found:
                self.pos = found.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.more():
                return ""

    def expect(self, chars: str, where: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            got = "the end of the file" if not c else repr(c)
            raise ConfigError(f"'{self.path}' is not a valid trace: expected {' or '.join(map(repr, chars))} "
                              f"{where}, got {got}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode one JSON value at the cursor, reading more text until it is complete."""
        self.peek()
        while True:
            try:
                value, end = _decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                at_end = exc.pos >= len(self.buf) - 1 or "Unterminated" in exc.msg
                if at_end and len(self.buf) - self.pos > MAX_EVENT_BYTES:
                    raise ConfigError(f"'{self.path}': one JSON value is larger than "
                                      f"{MAX_EVENT_BYTES >> 20} MiB; not a trace event") from None
                if at_end and self.more():
                    continue
                line = self.lines + self.buf.count("\n", 0, exc.pos) + 1
                raise ConfigError(f"'{self.path}' is not valid JSON: {exc.msg} (line {line})") from None
            except RecursionError:
                raise ConfigError(f"'{self.path}' is nested too deeply to be a trace") from None
            # A number at the very end of the window may continue in the next chunk.
            if end >= len(self.buf) and not self.eof and self.more():
                continue
            self.pos = end
            return value


def _open(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read trace '{path}': {exc.strerror}") from None


def iter_events(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> Iterator[Any]:
    """Each element of the trace's event list, in file order, decoded one at a time.

    Accepts ``{"traceEvents": [...], ...}`` (other top-level keys are decoded and dropped) or a
    bare event list. Elements are yielded as decoded (the caller checks their shape).
    """
    with _open(path) as handle:
        text = _Text(_Capped(handle, path, max_bytes), path)
        first = text.expect("{[", "at the start of the trace")
        if first == "{":
            found = False
            if text.peek() == "}":
                text.pos += 1
            else:
                while True:
                    if text.peek() != '"':
                        raise ConfigError(f"'{path}' is not valid JSON: Expecting property name "
                                          "enclosed in double quotes")
                    key = text.value()
                    text.expect(":", f"after key {key!r}")
                    if key == "traceEvents" and not found:
                        found = True
                        if text.peek() != "[":
                            raise ConfigError(f"'{path}': 'traceEvents' must be a list of events")
                        text.pos += 1
                        yield from _array(text)
                    else:
                        text.value()
                    if text.expect(",}", "between top-level entries") == "}":
                        break
            if not found:
                raise ConfigError(f"'{path}' is JSON but not a Chrome trace: expected an object "
                                  "with 'traceEvents' or a list of events")
        else:
            yield from _array(text)
        if text.peek():
            raise ConfigError(f"'{path}' is not valid JSON: extra data after the trace")


def _array(text: _Text) -> Iterator[Any]:
    if text.peek() == "]":
        text.pos += 1
        return
    while True:
        yield text.value()
        if text.expect(",]", "between trace events") == "]":
            return
