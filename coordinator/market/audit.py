"""The marketplace's append-only, hash-chained audit log: listings, gate overrides, buyers and keys, revocations,
payouts.

Each entry is a small JSON document (index, time, actor, action, details, and ``prev``: the previous entry's hash);
its hash is the sha256 of its canonical JSON (:func:`protos.crypto.canonical_json`). The log lives in the same
SQLite file as what it records (``audit_log`` in ``market.db``), so an action and its entry commit in one
transaction: a listing can never exist without its entry, nor an entry without its listing. Triggers refuse
UPDATE and DELETE through SQL; anyone who edits the file itself is caught by :func:`verify`, which names the first
entry that was edited, deleted or moved. Deleting entries at the very end leaves a valid shorter chain: keep
:func:`head` somewhere else (a ticket, a mail) and pass it to :func:`verify` to catch that too.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from coordinator.errors import CoordinatorError
from protos.crypto import canonical_json, sha256_hex
from protos.documents import Document, DocumentError

GENESIS = "0" * 64  # the ``prev`` of entry 0

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,  -- the entry's index: 0, 1, 2, ... in append order
    entry TEXT NOT NULL,      -- the entry's canonical JSON (without its own hash)
    hash TEXT NOT NULL        -- sha256 of ``entry``
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class AuditError(CoordinatorError):
    """The audit log does not verify: ``index`` is the first entry found edited, deleted or out of order."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"audit log entry {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass(frozen=True, kw_only=True)
class AuditEntry(Document):
    index: int
    time: str  # utc_timestamp()
    actor: str  # who did it: the OS user or ``--actor``
    action: str  # listing.add, listing.withdraw, gate.override, buyer.add, key.rotate, buyer.revoke, payouts, ...
    details: dict[str, Any]  # strings, integers, booleans, lists of them: no floats in hashed data
    prev: str  # the previous entry's hash (GENESIS for entry 0)

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def hash(self) -> str:
        return sha256_hex(self.canonical())


def head(db: sqlite3.Connection) -> tuple[int, str]:
    """``(number of entries, hash of the last one)``; ``(0, GENESIS)`` for an empty log."""
    row = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS) if row is None else (int(row[0]) + 1, str(row[1]))


def append(db: sqlite3.Connection, *, time: str, actor: str, action: str, details: dict[str, Any]) -> AuditEntry:
    """Append one entry; call inside the transaction that makes the change it records."""
    count, prev = head(db)
    entry = AuditEntry(index=count, time=time, actor=actor, action=action, details=details, prev=prev)
    body = entry.canonical()
    db.execute("INSERT INTO audit_log (seq, entry, hash) VALUES (?, ?, ?)", (count, body.decode("utf-8"),
                                                                            sha256_hex(body)))
    return entry


def _parse(position: int, text: str) -> AuditEntry:
    try:
        return AuditEntry.from_json(json.loads(text), f"entry {position}")
    except (json.JSONDecodeError, DocumentError) as error:
        raise AuditError(position, f"not a valid entry ({error})") from error


def entries(db: sqlite3.Connection) -> list[AuditEntry]:
    """Every entry in append order, unverified (see :func:`verify`)."""
    rows = db.execute("SELECT entry FROM audit_log ORDER BY seq").fetchall()
    return [_parse(position, row[0]) for position, row in enumerate(rows)]


def verify(db: sqlite3.Connection, expected_head: tuple[int, str] | None = None) -> int:
    """Check the whole chain; returns the number of entries or raises :class:`AuditError` naming the first bad
    entry. With ``expected_head`` (from :func:`head`, kept elsewhere), entries removed from the end are caught."""
    prev, hashes = GENESIS, []
    rows = db.execute("SELECT seq, entry, hash FROM audit_log ORDER BY seq").fetchall()
    for position, (seq, text, stored) in enumerate(rows):
        entry = _parse(position, text)
        if entry.index != position or seq != position:
            raise AuditError(position, f"holds entry {entry.index} at position {position}: an entry was deleted "
                                       "or the log was reordered")
        if sha256_hex(text.encode("utf-8")) != stored or entry.hash != stored:
            raise AuditError(position, "was edited: its hash does not match its content")
        if entry.prev != prev:
            raise AuditError(max(position - 1, 0), f"was edited: entry {position} no longer chains to it")
        prev = stored
        hashes.append(stored)
    if expected_head is not None:
        count, last = expected_head
        if count > len(hashes):
            raise AuditError(len(hashes), f"missing: the log has {len(hashes)} entries, the kept head says {count}")
        if count and hashes[count - 1] != last:
            raise AuditError(count - 1, "does not match the kept head hash")
    return len(hashes)
