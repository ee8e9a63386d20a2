"""Reading a configuration file that someone else named: only a regular file, never more
than a cap, opened so that a FIFO or a device cannot block or flood the reader."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_CONFIG_BYTES = 1 << 20  # a WireGuard config, a peer-names file, a web config


class FileInputError(Exception):
    """The file cannot be used; one line that names it (control characters escaped)."""


def shown(path: Path | str) -> str:
    """A path safe to print on one line."""
    text = str(path)
    return text if text.isprintable() else ascii(text)[1:-1]


def read_config_bytes(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. O_NONBLOCK makes opening a
    FIFO return at once (a blocking open waits for a writer forever); fstat then refuses
    anything that is not a regular file before a byte is read (/dev/zero never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise FileInputError(f"{shown(path)}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileInputError(f"{shown(path)}: not a regular file")
        if st.st_size > limit:
            raise FileInputError(f"{shown(path)}: larger than {limit} bytes")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while read
            raise FileInputError(f"{shown(path)}: larger than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise FileInputError(f"{shown(path)}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
