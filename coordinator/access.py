"""Who may call what: every RPC is authenticated (owner signature in metadata, fresh nonce, time window), and an
owner may act only on jobs it is enrolled in. Authentication happens before any request payload is read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import AuthenticationError, CoordinatorError, NotEnrolledError
from coordinator.paths import admin_public_key
from coordinator.records import Owner
from coordinator.state import StateStore
from protos.request_auth import ADMIN_CONTEXT, MAX_SKEW_S, RequestAuthError, parse_metadata


@dataclass(frozen=True)
class Caller:
    owner: Owner
    job_id: str  # the job the call is about: the owner is enrolled in it


def authenticate(store: StateStore, metadata: Iterable[tuple[str, str | bytes]], method: str, now: float) -> Caller:
    """The calling owner, approved and enrolled in the job its signed metadata names; else raise
    :class:`AuthenticationError` (details for the log) or :class:`NotEnrolledError`."""
    try:
        auth = parse_metadata(metadata)
        owner = store.approved_owner(auth.owner_id)
        auth.verify(owner.public_key, method, now)
    except (RequestAuthError, CoordinatorError) as error:
        raise AuthenticationError(f"{method}: {error}") from error
    if not store.use_nonce(owner.owner_id, auth.nonce, now, 2 * MAX_SKEW_S):
        raise AuthenticationError(f"{method}: owner {owner.owner_id!r} replayed nonce {auth.nonce}")
    if not store.is_member(auth.job_id, owner.owner_id):
        raise NotEnrolledError(f"owner {owner.owner_id!r} is not enrolled in job {auth.job_id!r}")
    return Caller(owner, auth.job_id)


@dataclass(frozen=True)
class AdminCaller:
    key_id: str  # the admin key registered in the state directory (``STATE/admin/KEY_ID.pub``)
    job_id: str


def authenticate_admin(store: StateStore, state_dir: Path, metadata: Iterable[tuple[str, str | bytes]], method: str,
                       now: float) -> AdminCaller:
    """An admin call: the same signed metadata as an owner's, under ``admin-request/v1``, with a registered admin
    key's id as the identity; an owner key (or anything else) fails with :class:`AuthenticationError`."""
    try:
        auth = parse_metadata(metadata)
        key = admin_public_key(state_dir, auth.owner_id)
        if key is None:
            raise AuthenticationError(f"{auth.owner_id!r} is not a registered admin key")
        auth.verify(key, method, now, ADMIN_CONTEXT)
    except (RequestAuthError, CoordinatorError) as error:
        raise AuthenticationError(f"admin {method}: {error}") from error
    if not store.use_nonce(f"admin:{auth.owner_id}", auth.nonce, now, 2 * MAX_SKEW_S):
        raise AuthenticationError(f"admin {method}: admin key {auth.owner_id!r} replayed nonce {auth.nonce}")
    return AdminCaller(auth.owner_id, auth.job_id)
