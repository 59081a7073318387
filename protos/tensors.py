"""A strict safetensors parser for bytes that crossed a trust boundary, and checks of a delta against its spec.

The parser reads only the length-prefixed JSON header and raw little-endian tensor bytes; it never unpickles,
and it checks what lenient parsers skip: header size, entry count, dtypes, shapes, and that the data offsets are
in range, exactly sized, non-overlapping and cover the data section with no holes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from protos.adapter_spec import AdapterSpec
from protos.errors import ProtocolError

MAX_HEADER_BYTES = 1 << 24
MAX_ENTRIES = 1 << 16
# The project's one dtype table: safetensors dtype names <-> torch dtypes (and their item sizes).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
ITEM_SIZES: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in TORCH_DTYPES.items()}


class SafetensorsFormatError(ProtocolError):
    """The bytes are not a well-formed safetensors file."""


class DeltaValidationError(ProtocolError):
    """The tensors are well formed but do not fit the adapter spec or the limits."""


class AdapterMismatchError(ProtocolError):
    """Tensors do not have exactly an adapter spec's names, shapes and dtypes."""


def check_adapter_tensors(spec: AdapterSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AdapterMismatchError` unless ``tensors`` has exactly the spec's names, shapes and dtypes."""
    expected = spec.by_name()
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterMismatchError(f"adapter is missing tensors: {', '.join(missing[:5])}")
    if unknown:
        raise AdapterMismatchError(f"adapter has unknown tensors: {', '.join(unknown[:5])}")
    for name, tensor in tensors.items():
        want = expected[name]
        if tuple(tensor.shape) != want.shape:
            raise AdapterMismatchError(f"{name}: shape {tuple(tensor.shape)} != expected {want.shape}")
        if SAFETENSORS_DTYPES.get(tensor.dtype) != want.dtype:
            raise AdapterMismatchError(f"{name}: dtype {tensor.dtype} != expected {want.dtype}")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(buf: bytes | bytearray | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_entries: int = MAX_ENTRIES) -> tuple[list[TensorEntry], int]:
    """The tensor entries (sorted by offset) and where the data section starts."""
    view = memoryview(buf)
    if len(view) < 8:
        raise SafetensorsFormatError(f"{len(view)} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > max_header_bytes or header_len > len(view) - 8:
        raise SafetensorsFormatError(f"header length {header_len} exceeds the limit ({max_header_bytes}) or the "
                                     f"{len(view)}-byte payload")
    try:
        header = json.loads(bytes(view[8:8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SafetensorsFormatError(f"header is not UTF-8 JSON: {error}") from error
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    if len(header) > max_entries:
        raise SafetensorsFormatError(f"{len(header)} entries exceed the limit of {max_entries}")
    entries = [_entry(name, info) for name, info in header.items()]
    data_start, data_len = 8 + header_len, len(view) - 8 - header_len
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlap" if entry.begin < position else "leave a hole"
            raise SafetensorsFormatError(f"{entry.name}: data offsets {entry.begin}..{entry.end} {kind} "
                                         f"(expected to start at {position})")
        position = entry.end
    if position != data_len:
        raise SafetensorsFormatError(f"tensors cover {position} of {data_len} data bytes")
    return entries, data_start


def _entry(name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"{name}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_SIZES:
        raise SafetensorsFormatError(f"{name}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise SafetensorsFormatError(f"{name}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise SafetensorsFormatError(f"{name}: data_offsets {offsets!r} are not an ordered pair")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEM_SIZES[dtype]:
        raise SafetensorsFormatError(f"{name}: {offsets[1] - offsets[0]} data bytes for shape {shape} of {dtype}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def load_tensors(buf: bytearray, **limits: int) -> dict[str, torch.Tensor]:
    """Parse ``buf`` strictly; the tensors share its memory (no copy), so keep ``buf`` alive and unchanged."""
    entries, data_start = parse_header(buf, **limits)
    view = memoryview(buf)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.end == entry.begin:
            tensors[entry.name] = torch.empty(entry.shape, dtype=dtype)
            continue
        start = data_start + entry.begin
        raw = view[start:data_start + entry.end]
        if start % ITEM_SIZES[entry.dtype]:
            raw = memoryview(bytearray(raw))  # misaligned (safetensors pads, but hostile files may not): copy
        tensors[entry.name] = torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)
    return tensors


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    total = 0.0
    for tensor in tensors.values():
        if tensor.is_floating_point():
            total += float(torch.linalg.vector_norm(tensor.double()) ** 2)
    return math.sqrt(total)


def validate_delta(tensors: Mapping[str, torch.Tensor], spec: AdapterSpec, *, max_norm: float) -> float:
    """Exact names/shapes/dtypes of ``spec``, every value finite, global L2 norm at most ``max_norm``."""
    try:
        check_adapter_tensors(spec, tensors)
    except AdapterMismatchError as error:
        raise DeltaValidationError(f"delta does not match the adapter spec: {error}") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DeltaValidationError(f"{name}: holds NaN or infinite values")
    norm = global_norm(tensors)
    if not math.isfinite(norm) or norm > max_norm:
        raise DeltaValidationError(f"delta L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm
