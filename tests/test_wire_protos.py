"""The generated protobuf modules match the .proto; the sealed format and the strict parser on their own."""

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

from protos.crypto import key_id
from protos.delta_keys import x25519_key_id
from protos.sealed import (
    ContextMismatchError,
    ExpectedContext,
    HeaderError,
    SealedHeader,
    SizeLimitError,
    open_sealed,
    read_sealed,
    seal_delta,
)
from protos.tensors import SafetensorsFormatError, load_tensors

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
    assert read_sealed(tmp_path / "blob").ciphertext == bytes(sealed.ciphertext)


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
