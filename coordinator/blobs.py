"""A content-addressed store of sealed blobs: ``blobs/sha256/<hex>``; partial writes live only in ``blobs/tmp``.

A blob becomes visible by fsync, rename and directory fsync; a crash leaves at most a temporary file (removed at
start) or an unreferenced blob (collected at start, since only a committed upload row makes a blob count).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.objects / digest

    def new_temp(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        return os.fdopen(fd, "w+b"), Path(name)

    def publish(self, stream: BinaryIO, temp: Path, digest: str) -> Path:
        """fsync ``stream`` (the temp file), rename it to its address, fsync the directory."""
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        final = self.path(digest)
        os.replace(temp, final)
        _fsync_dir(self.objects)
        return final

    def recover(self, referenced: set[str]) -> list[str]:
        """Remove temporary files and blobs no committed row references; return what was removed."""
        removed = []
        for path in self.tmp.iterdir():
            path.unlink(missing_ok=True)
            removed.append(f"tmp/{path.name}")
        for path in self.objects.iterdir():
            if path.name not in referenced:
                path.unlink(missing_ok=True)
                removed.append(f"sha256/{path.name}")
        return removed

    def visible(self) -> list[str]:
        return sorted(p.name for p in self.objects.iterdir())

