"""The coordinator's crash-safe records: one SQLite file, and nothing but SQL.

Owners (approved or revoked), jobs (each with its own adapter spec and reference adapter), rounds
(OPEN -> CLOSED -> AGGREGATED, or ABORTED with a reason) and uploads, unique per (job, round, owner) and per
(owner, upload id). An upload exists only once its row is committed. Blobs and delta keys live beside this store
(:mod:`coordinator.storage`); job creation, which also writes files, is :mod:`coordinator.jobs`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.errors import InvalidTransitionError, NotFoundError, OwnerNotApprovedError, UnknownOwnerError
from coordinator.records import (
    ACCESS_SCHEMA,
    SCHEMA,
    TRANSITIONS,
    Job,
    JobRow,
    Owner,
    UploadRecord,
    check_id,
    now,
)
from protos.adapter_spec import AdapterSpec
from protos.crypto import key_id, public_key_bytes, public_key_from_raw

DB_FILE = "state.db"


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / DB_FILE, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._db.executescript(ACCESS_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, *args: object) -> tuple | None:  # type: ignore[type-arg]
        with self._lock:
            row: tuple | None = self._db.execute(sql, args).fetchone()  # type: ignore[type-arg]
            return row

    # -- owners ---------------------------------------------------------------------------------------------
    def add_owner(self, owner_id: str, public_key: Ed25519PublicKey, *, approved: bool = False) -> Owner:
        status = "approved" if approved else "pending"
        with self.transaction() as db:
            db.execute("INSERT INTO owners VALUES (?, ?, ?, ?, ?)", (check_id("owner id", owner_id),
                       public_key_bytes(public_key), key_id(public_key), status, now()))
        return self.owner(owner_id)

    def set_owner_status(self, owner_id: str, status: str) -> Owner:
        with self.transaction() as db:
            if db.execute("UPDATE owners SET status = ?, updated_at = ? WHERE owner_id = ?",
                          (status, now(), owner_id)).rowcount != 1:
                raise UnknownOwnerError(f"owner {owner_id!r} is not registered")
        return self.owner(owner_id)

    def owner(self, owner_id: str) -> Owner:
        row = self._one("SELECT owner_id, public_key, key_id, status FROM owners WHERE owner_id = ?", owner_id)
        if row is None:
            raise UnknownOwnerError(f"owner {owner_id!r} is not registered")
        return Owner(row[0], public_key_from_raw(row[1]), row[2], row[3])

    def approved_owner(self, owner_id: str) -> Owner:
        owner = self.owner(owner_id)
        if owner.status != "approved":
            raise OwnerNotApprovedError(f"owner {owner_id!r} is {owner.status}, not approved")
        return owner

    def owners(self) -> list[Owner]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT owner_id FROM owners ORDER BY owner_id")]
        return [self.owner(i) for i in ids]

    def referenced_blobs(self) -> set[str]:
        """Every blob digest a committed upload row names."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT blob_sha256 FROM uploads")}

    # -- access: job members and request nonces ---------------------------------------------------------
    def enroll(self, job_id: str, owner_id: str) -> None:
        """Make an owner a member of a job (idempotent): members may read the job and submit to it."""
        self.job(job_id)
        self.owner(owner_id)
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO job_members VALUES (?, ?, ?)", (job_id, owner_id, now()))

    def unenroll(self, job_id: str, owner_id: str) -> None:
        with self.transaction() as db:
            if db.execute("DELETE FROM job_members WHERE job_id = ? AND owner_id = ?",
                          (job_id, owner_id)).rowcount != 1:
                raise NotFoundError(f"owner {owner_id!r} is not enrolled in job {job_id!r}")

    def is_member(self, job_id: str, owner_id: str) -> bool:
        return self._one("SELECT 1 FROM job_members WHERE job_id = ? AND owner_id = ?", job_id, owner_id) is not None

    def members(self, job_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT owner_id FROM job_members WHERE job_id = ? "
                                                   "ORDER BY owner_id", (job_id,))]

    def use_nonce(self, owner_id: str, nonce: str, now_s: float, ttl_s: float) -> bool:
        """Record a request nonce; False if the owner already used it within ``ttl_s`` (a replay)."""
        with self.transaction() as db:
            db.execute("DELETE FROM request_nonces WHERE expires_at < ?", (now_s,))
            try:
                db.execute("INSERT INTO request_nonces VALUES (?, ?, ?)", (owner_id, nonce, now_s + ttl_s))
            except sqlite3.IntegrityError:
                return False
        return True

    # -- jobs -----------------------------------------------------------------------------------------------
    def has_job(self, job_id: str) -> bool:
        return self._one("SELECT 1 FROM jobs WHERE job_id = ?", job_id) is not None

    def insert_job(self, row: JobRow) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (row.job_id,)).fetchone():
                raise InvalidTransitionError(f"job {row.job_id!r} already exists")
            values = (*astuple(row), now())
            db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}, created_at) VALUES ({', '.join('?' * len(values))})",
                       values)

    def job(self, job_id: str) -> Job:
        row = self._one("SELECT job_id, bundle_digest, bundle_tar_sha256, bundle_size, adapter_spec, reference_norm, "
                        "max_delta_norm_ratio, max_upload_bytes, max_plaintext_bytes, chunk_size, aggregator, "
                        "clip_norm, max_num_examples FROM jobs "
                        "WHERE job_id = ?", job_id)
        if row is None:
            raise NotFoundError(f"job {job_id!r} does not exist")
        return Job(row[0], row[1], row[2], row[3], AdapterSpec.from_json(json.loads(row[4])), *row[5:])

    def jobs(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT job_id FROM jobs ORDER BY job_id")]

    # -- rounds ---------------------------------------------------------------------------------------------
    def open_round(self, job_id: str, round: int) -> None:
        self.job(job_id)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rounds WHERE job_id = ? AND round = ?", (job_id, round)).fetchone():
                raise InvalidTransitionError(f"job {job_id!r} round {round} already exists")
            if db.execute("SELECT 1 FROM rounds WHERE job_id = ? AND state = 'OPEN'", (job_id,)).fetchone():
                raise InvalidTransitionError(f"job {job_id!r} already has an OPEN round")
            db.execute("INSERT INTO rounds VALUES (?, ?, 'OPEN', '', ?)", (job_id, round, now()))

    def _transition(self, job_id: str, round: int, action: str, reason: str = "") -> None:
        allowed, target = TRANSITIONS[action]
        with self.transaction() as db:
            state = self.round_state(job_id, round)
            if state not in allowed:
                raise InvalidTransitionError(f"cannot {action} job {job_id!r} round {round}: it is {state}")
            db.execute("UPDATE rounds SET state = ?, reason = ?, updated_at = ? WHERE job_id = ? AND round = ?",
                       (target, reason, now(), job_id, round))

    def close_round(self, job_id: str, round: int) -> None:
        self._transition(job_id, round, "close")

    def mark_aggregated(self, job_id: str, round: int) -> None:
        self._transition(job_id, round, "aggregate")

    def abort_round(self, job_id: str, round: int, reason: str) -> None:
        self._transition(job_id, round, "abort", reason)

    def round_state(self, job_id: str, round: int) -> str:
        row = self._one("SELECT state FROM rounds WHERE job_id = ? AND round = ?", job_id, round)
        if row is None:
            raise NotFoundError(f"job {job_id!r} has no round {round}")
        return str(row[0])

    def latest_round(self, job_id: str) -> tuple[int, str]:
        row = self._one("SELECT round, state FROM rounds WHERE job_id = ? ORDER BY round DESC LIMIT 1", job_id)
        return (0, "NONE") if row is None else (int(row[0]), str(row[1]))

    def round_status(self, job_id: str, round: int) -> tuple[str, str, int, int]:
        """``(state, reason, accepted uploads, total examples)``."""
        row = self._one("SELECT state, reason FROM rounds WHERE job_id = ? AND round = ?", job_id, round)
        if row is None:
            raise NotFoundError(f"job {job_id!r} has no round {round}")
        counts = self._one("SELECT COUNT(*), COALESCE(SUM(num_examples), 0) FROM uploads WHERE job_id = ? AND "
                           "round = ?", job_id, round)
        assert counts is not None
        return str(row[0]), str(row[1]), int(counts[0]), int(counts[1])

    # -- uploads --------------------------------------------------------------------------------------------
    def owner_upload(self, owner_id: str, upload_id: str) -> UploadRecord | None:
        """Upload ids are scoped per owner: the same id from two owners names two uploads."""
        row = self._one(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE owner_id = ? AND upload_id = ?", owner_id,
                        upload_id)
        return None if row is None else UploadRecord(*row)

    def slot(self, job_id: str, round: int, owner_id: str) -> UploadRecord | None:
        row = self._one(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE job_id = ? AND round = ? AND owner_id = ?",
                        job_id, round, owner_id)
        return None if row is None else UploadRecord(*row)

    def accepted_uploads(self, job_id: str, round: int) -> list[UploadRecord]:
        """In a deterministic order: by owner id."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE job_id = ? AND round = ? "
                                    "ORDER BY owner_id, upload_id", (job_id, round)).fetchall()
        return [UploadRecord(*row) for row in rows]

    def insert_upload(self, db: sqlite3.Connection, record: UploadRecord) -> None:
        db.execute(f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (record.upload_id, record.job_id, record.round, record.owner_id, record.blob_sha256,
                    record.plaintext_sha256, record.num_examples, record.accepted_at, record.receipt_json,
                    record.receipt_sig, record.preamble_sha256))


_JOB_COLUMNS = ("job_id, bundle_digest, bundle_tar_sha256, bundle_size, adapter_spec, spec_digest, reference_norm, "
                "max_delta_norm_ratio, max_upload_bytes, max_plaintext_bytes, chunk_size, aggregator, clip_norm, "
                "max_num_examples")  # in JobRow's order
_UPLOAD_COLUMNS = ("upload_id, job_id, round, owner_id, blob_sha256, plaintext_sha256, num_examples, accepted_at, "
                   "receipt_json, receipt_sig, preamble_sha256")

