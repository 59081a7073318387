"""Opening the coordinator's state for one admin command, with its errors mapped to the shared exit codes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from coordinator.cli.common import fail_with, state_dir
from coordinator.errors import CoordinatorError
from coordinator.storage import Storage
from protos.errors import ProtocolError

T = TypeVar("T")


@contextmanager
def opened(state: Path | None) -> Iterator[Storage]:
    """The state directory (``--state``), closed afterwards; a domain error fails the command."""
    storage = Storage.open(state_dir(state))
    try:
        yield storage
    except (CoordinatorError, ProtocolError, ValueError, FileNotFoundError) as error:
        fail_with(error)
    finally:
        storage.close()


def run(state: Path | None, action: Callable[[Storage], T]) -> T:
    with opened(state) as storage:
        return action(storage)
    raise AssertionError("unreachable")  # pragma: no cover - opened() either yields or exits
