"""The client package's errors: one root, and a settings error that names its key."""

from __future__ import annotations

from protos.errors import FieldError


class ClientError(Exception):
    """Root of every error the client package raises on purpose."""


class OwnerSettingsError(ClientError, FieldError):
    """A missing or invalid data-owner setting; the message marks the setting as ``{field}``."""
