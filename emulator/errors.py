"""The emulator package's errors: one root, and a config error that names its field."""

from __future__ import annotations

from protos.errors import FieldError


class EmulatorError(ValueError):
    """Root of every error the emulator package raises on purpose."""


class EmulatorConfigError(EmulatorError, FieldError):
    """An invalid setting; the message marks the config field as ``{field}`` (see :class:`FieldError`)."""


class CompressError(EmulatorConfigError):
    """An invalid compressor setting; the message names the field."""
