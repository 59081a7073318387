"""Local-file helpers both sides share: atomic writes, the timestamp format, and ``$OFFSITE_HOME``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_HOME = "~/.offsite"


def atomic_write(path: Path, data: bytes | str | Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Write ``path`` so that a crash leaves either the old file or the new one, never a torn one.

    ``data`` is the content, or a function that writes a given (temporary) path, such as a safetensors saver.
    ``mode`` sets the file's permissions before any byte is written (0o600 for private keys).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
            if mode is not None:
                os.chmod(tmp, mode)
        else:
            raw = data.encode("utf-8") if isinstance(data, str) else data
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def utc_timestamp(moment: datetime | None = None) -> str:
    """The one timestamp format: ISO 8601 UTC with microseconds, ``2026-11-26T17:18:37.123456Z``."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def offsite_home() -> Path:
    """``$OFFSITE_HOME`` (default ``~/.offsite``): each side keeps its keys and state in a folder under it."""
    return Path(os.environ.get("OFFSITE_HOME") or DEFAULT_HOME).expanduser()
