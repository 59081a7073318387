"""Typed JSON documents: dataclasses that validate on read.

A dataclass that mixes in :class:`Document` gets ``to_json`` and ``from_json``. Reading checks every field: a
missing key, an unknown key or a wrong type raises :class:`DocumentError` naming the field's path
(``manifest.base_model.n_layers``). Optional fields (``X | None = None``) are left out of the JSON when None.
A field whose JSON key differs from its name (``class``) says so with ``field(metadata={"json": "class"})``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from protos.errors import ProtocolError

D = TypeVar("D", bound="Document")


class DocumentError(ProtocolError):
    """A JSON document does not have the fields and types its dataclass says; the message names the field."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def _json_name(field: dataclasses.Field[Any]) -> str:
    return str(field.metadata.get("json", field.name))


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)


def _decode_value(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise DocumentError(where, f"expected a path string, got {type(value).__name__}")
        return Path(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _decode_value(options[0], value, where)
        for option in options:
            try:
                return _decode_value(option, value, where)
            except DocumentError:
                continue
        raise DocumentError(where, f"expected {' or '.join(map(_type_name, options))}, got {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise DocumentError(where, f"expected a list, got {type(value).__name__}")
        return [_decode_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise DocumentError(where, f"expected an object, got {type(value).__name__}")
        return {k: _decode_value(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(kind, type) and issubclass(kind, Document):
        return kind.from_json(value, where)
    if isinstance(kind, type) and hasattr(kind, "from_json"):  # a type with its own reader (AdapterSpec)
        try:
            return kind.from_json(value)
        except (ProtocolError, KeyError, TypeError, ValueError) as error:
            raise DocumentError(where, str(error)) from error
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DocumentError(where, f"expected a number, got {type(value).__name__}")
        return float(value)
    if kind in (int, str, bool):
        if type(value) is not kind:
            raise DocumentError(where, f"expected {kind.__name__}, got {type(value).__name__}")
        return value
    raise DocumentError(where, f"unsupported field type {_type_name(kind)}")  # pragma: no cover - a coding error


def _encode_value(value: Any) -> Any:
    if isinstance(value, Document):
        return value.to_json()
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


class Document:
    """Mixin for frozen dataclasses that are stored or sent as JSON objects."""

    @classmethod
    def from_json(cls: type[D], data: Any, where: str | None = None) -> D:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise DocumentError(where, f"expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        known = {_json_name(f) for f in fields}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DocumentError(f"{where}.{unknown[0]}", "unknown field")
        values: dict[str, Any] = {}
        for field in fields:
            if not field.init:
                continue
            key = _json_name(field)
            if key not in data:
                has_default = (field.default is not dataclasses.MISSING
                               or field.default_factory is not dataclasses.MISSING)
                if not has_default:
                    raise DocumentError(f"{where}.{key}", "missing field")
                continue
            values[field.name] = _decode_value(hints[field.name], data[key], f"{where}.{key}")
        try:
            return cls(**values)
        except DocumentError as error:  # from a __post_init__ check: name the field in full
            raise DocumentError(f"{where}.{error.where}", error.reason) from error
        except (TypeError, ValueError) as error:
            raise DocumentError(where, str(error)) from error

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            out[_json_name(field)] = _encode_value(value)
        return out
