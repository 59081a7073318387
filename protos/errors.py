"""The roots of the project's errors, and the exit codes both CLIs share.

Every package has one root error class (``protos``: :class:`ProtocolError`; ``emulator``: ``EmulatorError``;
``coordinator``: ``CoordinatorError``; ``client``: ``ClientError``). Errors about a setting are also
:class:`FieldError`: the library names the config field (``keep``), and a CLI renders it as its flag (``--keep``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import IntEnum

_MARKER = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class ExitCode(IntEnum):
    """What both CLIs exit with, by the kind of failure."""

    OK = 0
    FAILED = 1  # a check failed or a peer refused: bad signature, tampered bundle, rejected upload, state conflict
    BAD_INPUT = 2  # the user's input is wrong: a setting, a missing or malformed file, an existing output


class ProtocolError(ValueError):
    """Root of the wire contract's errors (bundles, manifests, sealed deltas, keys, tensors)."""


class FieldError(ValueError):
    """A setting is invalid. The template marks field names as ``{field}``: ``str()`` shows the field names,
    :meth:`render` shows whatever names the caller uses for them (CLI flags, run-config keys)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(_MARKER.findall(template)))
        super().__init__(self.render())

    @property
    def field(self) -> str:
        """The first field the message names."""
        return self.fields[0] if self.fields else ""

    def render(self, name: Callable[[str], str] | None = None) -> str:
        rename = name or (lambda field: field)
        return _MARKER.sub(lambda match: rename(match.group(1)), self.template)


def cli_flag(field: str, overrides: Mapping[str, str] | None = None) -> str:
    """The CLI flag of a config field: ``batch_size`` -> ``--batch-size`` unless ``overrides`` says otherwise."""
    if overrides and field in overrides:
        return overrides[field]
    return "--" + field.replace("_", "-")


def run_config_key(field: str) -> str:
    """The Flower run/node-config key of a field: ``lora_r`` -> ``lora-r``."""
    return field.replace("_", "-")


def exit_code_for(error: BaseException) -> ExitCode:
    """Bad input (a setting, a file the user named, an output that exists) or a failed check."""
    if isinstance(error, FieldError | FileNotFoundError | FileExistsError | IsADirectoryError):
        return ExitCode.BAD_INPUT
    if getattr(error, "bad_input", False):
        return ExitCode.BAD_INPUT
    return ExitCode.FAILED


def describe(error: BaseException, flags: Mapping[str, str] | None = None) -> tuple[str, ExitCode]:
    """What a CLI prints for ``error`` (fields rendered as its flags) and the code it exits with."""
    if isinstance(error, FieldError):
        return error.render(lambda field: cli_flag(field, flags)), exit_code_for(error)
    return str(error), exit_code_for(error)


class OutputExistsError(FieldError, FileExistsError):
    """An output already exists and the caller did not ask to replace it (the ``force`` setting)."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path} already exists; set {{force}} to replace it")
