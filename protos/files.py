"""Local-file helpers both sides share: atomic writes, the timestamp format, and ``$OFFSITE_HOME``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_HOME = "~/.offsite"


def _private_dir_mode(mode: int) -> int:
    """A new directory for a file of ``mode``: no wider than the file, searchable where readable (0o600 -> 0o700)."""
    return (mode & 0o666) | ((mode & 0o444) >> 2)


def atomic_write(path: Path, data: bytes | str | Callable[[Path], object], *, mode: int | None = None) -> Path:
    """Write ``path`` so that a crash leaves either the old file or the new one, never a torn one.

    ``data`` is the content, or a function that writes a given (temporary) path, such as a safetensors saver.
    ``mode`` (0o600 for private keys) is the temporary file's mode from the moment it is created, before any byte
    is written, whatever a stale temporary file left behind had; a parent directory this call creates gets the
    mode's directory form (0o600: 0o700). Without ``mode`` a new file is 0o644, less the umask.
    """
    path = Path(path)
    if mode is not None and not path.parent.exists():
        dir_mode = _private_dir_mode(mode)
        try:
            path.parent.mkdir(parents=True, mode=dir_mode)
        except FileExistsError:  # made meanwhile by someone else: not ours to tighten
            pass
        else:
            os.chmod(path.parent, dir_mode)  # mkdir's mode is masked by the umask; this is exactly the mode
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a stale one keeps its mode through O_TRUNC: never write into it
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
        if mode is not None:
            os.fchmod(fd, mode)  # exactly ``mode``, not ``mode`` less the umask
        with os.fdopen(fd, "wb") as out:
            if not callable(data):
                out.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            data(tmp)  # writes into the file just created, which already has ``mode``
            if mode is not None:
                os.chmod(tmp, mode)  # in case the writer replaced the file rather than writing into it
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
