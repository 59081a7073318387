"""The data owner's own record of accepted uploads: each verified receipt, kept as JSON under
``DIR/<job>/<upload id>.json`` (written atomically), so ``offsite-client status`` can show them later."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from protos.files import atomic_write
from protos.messages import Receipt
from protos.sealed_header import ID_PATTERN


def _checked(kind: str, value: str) -> str:
    if not ID_PATTERN.match(value):  # ids become path parts: only the ids the wire contract allows
        raise ValueError(f"{kind} {value!r} is not a valid id")
    return value


def save_receipt(directory: Path, receipt: Receipt) -> Path:
    path = Path(directory) / _checked("job id", receipt.job_id) / f"{_checked('upload id', receipt.upload_id)}.json"
    return atomic_write(path, json.dumps(asdict(receipt), indent=2, sort_keys=True) + "\n")


def load_receipts(directory: Path, job_id: str) -> list[Receipt]:
    """The job's saved receipts, by round then upload id (unreadable files are skipped)."""
    folder = Path(directory) / _checked("job id", job_id)
    receipts = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            receipts.append(Receipt(**json.loads(path.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            continue
    return sorted(receipts, key=lambda r: (r.round, r.upload_id))
