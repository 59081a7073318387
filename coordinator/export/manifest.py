"""The export manifest: what an export is (job, rounds, digests of the adapter, bundle, base model and report) and
every file's digest, signed by the coordinator under ``export-manifest/v1``."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import crypto
from protos.documents import Document, DocumentError
from protos.errors import ProtocolError
from protos.files import atomic_write

EXPORT_MANIFEST = "export-manifest.json"
CONTEXT = "export-manifest/v1"
FORMATS = ("safetensors", "peft", "layers", "onnx")


class ExportVerifyError(ProtocolError):
    """An export does not match its signed manifest; the message names the file or field."""


@dataclass(frozen=True, kw_only=True)
class ExportManifest(Document):
    format: str  # safetensors, peft (LoRA adapter), layers (adapter blocks + layer map) or onnx
    job_id: str
    rounds: int
    task: str
    method: str
    labels: list[str] | None = None
    base_model_id: str
    base_model_sha256: str  # the full model's weights digest, as its bundle manifest records it
    adapter_sha256: str  # of the global adapter checkpoint the export was made from
    bundle_sha256: str  # the bundle's identity (sha256 of its signed manifest)
    report_sha256: str | None = None  # the evaluation report (JSON) of the run
    created: str
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    signer: str = ""  # the coordinator key's id
    signature: str = ""  # base64 Ed25519 over the canonical JSON of everything else

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DocumentError("format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")

    def signed_bytes(self) -> bytes:
        unsigned = self.to_json()
        unsigned.pop("signature", None)
        return crypto.canonical_json(unsigned)


def _files(out_dir: Path) -> dict[str, str]:
    return {path.relative_to(out_dir).as_posix(): crypto.sha256_file(path)
            for path in sorted(out_dir.rglob("*")) if path.is_file() and path.name != EXPORT_MANIFEST}


def sign_export(out_dir: Path, manifest: ExportManifest, key: Ed25519PrivateKey) -> ExportManifest:
    """Hash every file in ``out_dir``, sign, and write ``export-manifest.json`` (last, atomically)."""
    filled = replace(manifest, files=_files(out_dir), signer=crypto.key_id(key.public_key()), signature="")
    signature = crypto.sign(key, CONTEXT, filled.signed_bytes())
    signed = replace(filled, signature=base64.b64encode(signature).decode("ascii"))
    atomic_write(out_dir / EXPORT_MANIFEST, json.dumps(signed.to_json(), indent=2) + "\n")
    return signed


def read_export_manifest(out_dir: Path) -> ExportManifest:
    path = Path(out_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise ExportVerifyError(f"{out_dir}: no {EXPORT_MANIFEST}; is it an export directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportVerifyError(f"{path}: not valid JSON") from error
    return ExportManifest.from_json(data, EXPORT_MANIFEST)


def verify_export(out_dir: Path, coordinator_key: Ed25519PublicKey) -> ExportManifest:
    """The export's manifest once its signature and every file's digest check; extra or missing files fail."""
    out_dir = Path(out_dir)
    manifest = read_export_manifest(out_dir)
    if manifest.signer != crypto.key_id(coordinator_key):
        raise ExportVerifyError(f"signer: signed by key {manifest.signer[:16]}, not the pinned coordinator key")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
        crypto.verify(coordinator_key, signature, CONTEXT, manifest.signed_bytes())
    except (binascii.Error, crypto.SignatureError) as error:
        raise ExportVerifyError("signature: the export manifest's signature does not verify") from error
    actual = _files(out_dir)
    for name in sorted(set(manifest.files) | set(actual)):
        if name not in actual:
            raise ExportVerifyError(f"{name}: listed in the manifest but missing")
        if name not in manifest.files:
            raise ExportVerifyError(f"{name}: not listed in the signed manifest")
        if not hmac.compare_digest(actual[name], manifest.files[name]):
            raise ExportVerifyError(f"{name}: sha256 differs from the signed manifest")
    return manifest
