"""The hash-chained audit log: every edit, deletion and reordering of the file is found, and named by index."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.market import audit
from coordinator.market.store import DB_FILE, MarketStore
from protos.crypto import canonical_json, sha256_hex


def written_log(state: Path, entries: int = 6) -> tuple[int, str]:
    store = MarketStore(state)
    for index in range(entries):
        store.audit("tester", "buyer.add", {"buyer": f"buyer-{index}", "tokens_per_day": 1000 + index})
    with store.reading() as db:
        assert audit.verify(db) == entries
        kept = audit.head(db)
    store.close()
    return kept


def tamper(state: Path, change: Callable[[sqlite3.Connection], object]) -> None:
    """What someone with the file does: drop the append-only triggers, change rows, commit."""
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    db.execute("DROP TRIGGER audit_log_no_update")
    db.execute("DROP TRIGGER audit_log_no_delete")
    change(db)
    db.close()


def verify_error(state: Path, expected_head: tuple[int, str] | None = None) -> audit.AuditError:
    store = MarketStore(state)
    try:
        with store.reading() as db, pytest.raises(audit.AuditError) as caught:
            audit.verify(db, expected_head)
        return caught.value
    finally:
        store.close()


def edited(text: str) -> str:
    entry = json.loads(text)
    entry["details"]["tokens_per_day"] = 10**9
    return canonical_json(entry).decode()


def test_sql_cannot_update_or_delete(tmp_path: Path) -> None:
    written_log(tmp_path)
    store = MarketStore(tmp_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), store.transaction() as db:
        db.execute("UPDATE audit_log SET entry = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), store.transaction() as db:
        db.execute("DELETE FROM audit_log WHERE seq = 1")
    store.close()


def test_edit_is_named(tmp_path: Path) -> None:
    written_log(tmp_path)
    row = sqlite3.connect(tmp_path / DB_FILE).execute("SELECT entry FROM audit_log WHERE seq = 3").fetchone()
    tamper(tmp_path, lambda db: db.execute("UPDATE audit_log SET entry = ? WHERE seq = 3", (edited(row[0]),)))
    error = verify_error(tmp_path)
    assert error.index == 3 and "edited" in str(error)


def test_edit_with_recomputed_hash_is_named(tmp_path: Path) -> None:
    """The editor also rewrites the stored hash: the next entry's link still names the edited one."""
    written_log(tmp_path)
    row = sqlite3.connect(tmp_path / DB_FILE).execute("SELECT entry FROM audit_log WHERE seq = 2").fetchone()
    text = edited(row[0])
    tamper(tmp_path, lambda db: db.execute("UPDATE audit_log SET entry = ?, hash = ? WHERE seq = 2",
                                           (text, sha256_hex(text.encode()))))
    error = verify_error(tmp_path)
    assert error.index == 2 and "entry 3 no longer chains" in str(error)


def test_delete_is_named(tmp_path: Path) -> None:
    written_log(tmp_path)
    tamper(tmp_path, lambda db: db.execute("DELETE FROM audit_log WHERE seq = 4"))
    error = verify_error(tmp_path)
    assert error.index == 4 and "deleted" in str(error)


def test_delete_and_renumber_is_named(tmp_path: Path) -> None:
    """Rows renumbered after a deletion: the entries' own indices still give it away."""
    written_log(tmp_path)

    def change(db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM audit_log WHERE seq = 1")
        db.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq > 1")

    tamper(tmp_path, change)
    assert verify_error(tmp_path).index == 1


def test_reorder_is_named(tmp_path: Path) -> None:
    written_log(tmp_path)
    rows = dict(sqlite3.connect(tmp_path / DB_FILE).execute("SELECT seq, entry || char(0) || hash FROM audit_log"))

    def swap(db: sqlite3.Connection) -> None:
        for seq, other in ((2, 4), (4, 2)):
            text, digest = rows[other].split("\0")
            db.execute("UPDATE audit_log SET entry = ?, hash = ? WHERE seq = ?", (text, digest, seq))

    tamper(tmp_path, swap)
    error = verify_error(tmp_path)
    assert error.index == 2 and "reordered" in str(error)


def test_truncation_is_caught_with_a_kept_head(tmp_path: Path) -> None:
    kept = written_log(tmp_path)
    tamper(tmp_path, lambda db: db.execute("DELETE FROM audit_log WHERE seq = 5"))
    store = MarketStore(tmp_path)
    with store.reading() as db:
        assert audit.verify(db) == 5  # a shorter chain is still a chain ...
    store.close()
    error = verify_error(tmp_path, kept)  # ... but not the one whose head was kept
    assert error.index == 5 and "missing" in str(error)


def test_cli_audit_verify(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli.market import market_app

    written_log(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(market_app, ["audit", "verify", "--state", str(tmp_path)])
    assert ok.exit_code == 0 and "6 entries" in ok.output
    tamper(tmp_path, lambda db: db.execute("DELETE FROM audit_log WHERE seq = 0"))
    bad = runner.invoke(market_app, ["audit", "verify", "--state", str(tmp_path)])
    assert bad.exit_code == 1 and "audit log entry 0" in bad.output
