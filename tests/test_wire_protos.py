"""The generated protobuf modules match the .proto; the sealed format (v2) and the strict parser on their own."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from safetensors.torch import save

from protos.adapter_spec import AdapterSpec, TensorSpec
from protos.crypto import canonical_json, key_id
from protos.delta_keys import x25519_key_id
from protos.sealed import (
    TRAILER_BYTES,
    ContextMismatchError,
    DecryptionError,
    ExpectedContext,
    HeaderError,
    SealedHeader,
    SealedSignatureError,
    SizeLimitError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    max_plaintext_length,
    read_preamble,
    read_sealed,
    seal_delta,
)
from protos.sealed_open import Unsealer, open_sealed
from protos.tensors import TORCH_DTYPES, SafetensorsFormatError, load_tensors

ROOT = Path(__file__).resolve().parents[1]


def test_generated_modules_do_not_drift(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True,
                   capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "nothing was generated"
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "protos").rglob("*_pb2*") if "__pycache__" not in p.parts)
    assert fresh == committed
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} drifted: run scripts/gen_protos.py"


def _sealed(tmp_path: Path, payload: dict[str, torch.Tensor] | bytes, chunk_size: int = 1024):  # type: ignore[no-untyped-def]
    owner, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    sealed = seal_delta(payload, job_id="j", round=1, owner_id="o", upload_id="u", adapter_spec_digest="ab" * 32,
                        num_examples=4, owner_key=owner, recipient_public=recipient.public_key(),
                        chunk_size=chunk_size)
    sealed.write(tmp_path / "blob")
    expected = ExpectedContext("j", 1, "o", key_id(owner.public_key()), "ab" * 32,
                               x25519_key_id(recipient.public_key()))
    return sealed, owner, recipient, expected


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_seal_open_roundtrip_at_chunk_boundaries(tmp_path: Path, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    sealed, owner, recipient, expected = _sealed(tmp_path, payload)
    assert len(sealed.ciphertext) == size + 16 * max(1, -(-size // 1024))
    opened = open_sealed(tmp_path / "blob", recipient_private=recipient, sender_public=owner.public_key(),
                         expected=expected, max_plaintext_bytes=1 << 20)
    assert bytes(opened.plaintext) == payload
    assert opened.blob_id == sealed.blob_id()
    again = read_sealed(tmp_path / "blob")
    assert again.ciphertext == bytes(sealed.ciphertext) and again.trailer == sealed.trailer
    assert (tmp_path / "blob").stat().st_size == len(sealed.preamble()) + len(sealed.ciphertext) + TRAILER_BYTES


def test_unsealer_takes_the_ciphertext_in_parts_of_any_size(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 20
    sealed, owner, recipient, _ = _sealed(tmp_path, payload)
    whole = bytes(sealed.ciphertext)
    for cuts in ([], [1, 2, 3], [1040], [1039, 1041, 2080, 2081], list(range(0, len(whole), 333))):
        unsealer = Unsealer(sealed.header, sealed.header_json, sealed.wrapped_key, recipient)
        bounds = [0, *cuts, len(whole)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            unsealer.update(whole[start:end])
        assert unsealer.finish(sealed.trailer, owner.public_key()) == sealed.tags_digest()
        assert bytes(unsealer.plaintext) == payload
    unsealer = Unsealer(sealed.header, sealed.header_json, sealed.wrapped_key, recipient)
    with pytest.raises(TrailingDataError, match="after the final chunk"):
        unsealer.update(whole + b"x")
    unsealer.update(whole[:-1])
    with pytest.raises(TruncatedError, match="final chunk is missing"):
        unsealer.finish(sealed.trailer, owner.public_key())
    with pytest.raises(DecryptionError, match="wrapped data key"):
        Unsealer(sealed.header, sealed.header_json, sealed.wrapped_key, X25519PrivateKey.generate())


def test_open_refuses_tampered_preamble_trailer_and_length(tmp_path: Path) -> None:
    sealed, owner, recipient, expected = _sealed(tmp_path, b"payload" * 400)
    blob = (tmp_path / "blob").read_bytes()
    kwargs = {"recipient_private": recipient, "sender_public": owner.public_key(), "expected": expected,
              "max_plaintext_bytes": 1 << 20}
    preamble = len(sealed.preamble())
    cases = {
        "trailer signature": (blob[:-1] + bytes([blob[-1] ^ 1]), SealedSignatureError),
        "header and wrapped key": (blob[:preamble - 1] + bytes([blob[preamble - 1] ^ 1]) + blob[preamble:],
                                   SealedSignatureError),
        "chunk 1 of 3": (blob[:preamble + 1100] + bytes([blob[preamble + 1100] ^ 1]) + blob[preamble + 1101:],
                         DecryptionError),
        "missing": (blob[:-TRAILER_BYTES], TruncatedError),
        "after the trailer": (blob + b"\0", TrailingDataError),
    }
    for words, (data, error) in cases.items():
        (tmp_path / "bad").write_bytes(data)
        with pytest.raises(error, match=words):
            open_sealed(tmp_path / "bad", **kwargs)  # type: ignore[arg-type]


def test_format_v1_is_refused_by_its_version(tmp_path: Path) -> None:
    sealed, *_ = _sealed(tmp_path, b"x" * 10)
    blob = bytearray((tmp_path / "blob").read_bytes())
    blob[7] = 1  # the v1 magic
    (tmp_path / "v1").write_bytes(blob)
    with open(tmp_path / "v1", "rb") as stream, pytest.raises(UnsupportedVersionError, match="version 1 is not"):
        read_preamble(stream)
    v1_header = canonical_json({**json.loads(sealed.header_json), "version": 1, "plaintext_sha256": "00" * 32})
    with pytest.raises(UnsupportedVersionError, match="version 1 is not supported"):
        SealedHeader.from_bytes(v1_header)
    with pytest.raises(HeaderError, match="fields differ"):  # v2 has no plaintext digest
        SealedHeader.from_bytes(canonical_json({**json.loads(sealed.header_json), "plaintext_sha256": "00" * 32}))


SPECS = [
    AdapterSpec("one", (TensorSpec("w", "w", (3, 5), "F32"),)),
    AdapterSpec("mixed", tuple(TensorSpec(f"blocks.{i}.{kind}", "e", shape, dtype) for i in range(12)
                               for kind, shape, dtype in (("weight", (64, 48), "F16"), ("bias", (48,), "BF16"),
                                                          ("scale", (), "F64"), ("empty", (0, 7), "I8")))),
    AdapterSpec("names", (TensorSpec('odd "name" \\ ü', "x", (2, 2), "F32"), TensorSpec("n" * 300, "y", (9,), "U8"))),
    AdapterSpec("big", (TensorSpec("a", "a", (1000, 1000), "F32"), TensorSpec("b", "b", (1,), "I64"))),
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.method for s in SPECS])
def test_max_plaintext_length_bounds_what_safetensors_writes(spec: AdapterSpec) -> None:
    tensors = {t.name: torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype]) for t in spec.tensors}
    actual, limit = len(save(tensors)), max_plaintext_length(spec)
    digits = len(str(sum(t.numel() * t.element_size() for t in tensors.values())))
    assert actual <= limit <= actual + 7 + 2 * (digits - 1) * len(spec.tensors)
    with_metadata = len(save(tensors, metadata={"k": "v" * 4096}))
    assert with_metadata > limit  # metadata is not part of a delta


def test_open_refuses_other_contexts_and_limits(tmp_path: Path) -> None:
    sealed, owner, recipient, expected = _sealed(tmp_path, {"w": torch.ones(100)})
    kwargs = {"recipient_private": recipient, "sender_public": owner.public_key()}
    with pytest.raises(ContextMismatchError, match="round"):
        open_sealed(tmp_path / "blob", expected=ExpectedContext(**{**expected.__dict__, "round": 2}),
                    max_plaintext_bytes=1 << 20, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SizeLimitError):
        open_sealed(tmp_path / "blob", expected=expected, max_plaintext_bytes=10, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(HeaderError, match="canonical"):
        SealedHeader.from_bytes(json.dumps(json.loads(sealed.header_json), indent=1).encode())
    with pytest.raises(HeaderError, match="chunk_size"):
        SealedHeader.from_bytes(sealed.header_json.replace(b'"chunk_size":1024', b'"chunk_size":1'))


def test_strict_parser_accepts_safetensors_and_refuses_holes() -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    parsed = load_tensors(bytearray(save(tensors)))
    assert all(torch.equal(parsed[k], v) for k, v in tensors.items())
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    with pytest.raises(SafetensorsFormatError, match="hole"):
        load_tensors(bytearray(struct.pack("<Q", len(header)) + header + bytes(8)))
    header = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    with pytest.raises(SafetensorsFormatError, match="data bytes for shape"):
        load_tensors(bytearray(struct.pack("<Q", len(header)) + header + bytes(8)))
    many = json.dumps({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(10)}).encode()
    with pytest.raises(SafetensorsFormatError, match="entries"):
        load_tensors(bytearray(struct.pack("<Q", len(many)) + many), max_entries=5)
