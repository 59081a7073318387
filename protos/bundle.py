"""The signed bundle: a directory (or one ``.tar`` of it) whose ``manifest.json`` lists the sha256 of every file
and carries the coordinator's Ed25519 signature over a canonical encoding of itself.

Verification reads only JSON and hashes bytes: nothing in a bundle is ever unpickled. A bundle holds only the
file types on :data:`ALLOWED_FILES` (safetensors weights, JSON configs, tokenizer JSON/text): no pickles, no Python
modules, nothing a loader could run. Signing refuses any other file, and so does verification, signed or not.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.adapter_spec import AdapterSpec, AdapterSpecError
from protos.crypto import (
    SignatureError,
    canonical_json,
    key_id,
    public_key_bytes,
    sha256_file,
    sha256_hex,
    sign,
    verify,
)
from protos.documents import DocumentError
from protos.errors import ProtocolError
from protos.files import atomic_write
from protos.manifests import BUNDLE_FORMAT_VERSION, BundleManifest, SignerInfo

MANIFEST = "manifest.json"
ADAPTER_SPEC_FILE = "adapter/adapter_spec.json"
ADAPTER_WEIGHTS_FILE = "adapter/adapter.safetensors"
EMULATOR_DIR = "emulator"
TOKENIZER_DIR = "tokenizer"
SIGNATURE_CONTEXT = "bundle-manifest/v1"
CURVE_FILE = "distill_curve.json"

# Every file a bundle may hold, as (directory, name patterns); one level deep, no sub-directories. The tokenizer's
# are the JSON/text files transformers' save_pretrained writes for the supported families (a fast tokenizer:
# tokenizer.json and tokenizer_config.json, plus chat_template.jinja when it has a chat template; the legacy
# vocabulary formats: vocab.txt, vocab.json + merges.txt, added_tokens.json, special_tokens_map.json).
ALLOWED_FILES: dict[str, tuple[str, ...]] = {
    "": (MANIFEST, CURVE_FILE),
    EMULATOR_DIR: ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"),
    TOKENIZER_DIR: ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja"),
    "adapter": ("adapter_spec.json", "adapter.safetensors"),
}


class BundleError(ProtocolError):
    """A bundle failed verification. ``path`` names the file at fault."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class TamperedFileError(BundleError):
    pass


class MissingFileError(BundleError):
    pass


class ExtraFileError(BundleError):
    pass


class BadSignatureError(BundleError):
    pass


class UnknownKeyError(BundleError):
    pass


class UnsupportedFormatError(BundleError):
    pass


class MalformedManifestError(BundleError):
    pass


class DisallowedFileError(BundleError):
    """A file whose type a bundle may not hold (a pickle, a Python module, ...), listed and signed or not."""


def is_allowed_file(rel: str) -> bool:
    """Whether ``rel`` (a ``/``-separated path relative to the bundle root) is on :data:`ALLOWED_FILES`."""
    directory, _, name = rel.rpartition("/")
    patterns = ALLOWED_FILES.get(directory, ())
    return bool(name) and not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_allowed_files(rels: Iterable[str]) -> None:
    """Raise :class:`DisallowedFileError` for the first (in sorted order) of ``rels`` not on the allowlist."""
    for rel in sorted(rels):
        if not is_allowed_file(rel):
            raise DisallowedFileError(rel, "a bundle may not hold this file type (allowed: safetensors weights, "
                                           "JSON configs, tokenizer JSON/text files)")


@dataclass(frozen=True)
class VerifiedBundle:
    root: Path
    manifest: BundleManifest
    adapter_spec: AdapterSpec
    digest: str  # the bundle's identity: sha256 of its canonical, signed manifest

    @property
    def emulator_dir(self) -> Path:
        return self.root / EMULATOR_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def adapter_weights(self) -> Path:
        return self.root / ADAPTER_WEIGHTS_FILE


def manifest_digest(manifest: BundleManifest) -> str:
    return sha256_hex(canonical_json(manifest.to_json()))


def _bundle_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise ExtraFileError(rel, "symbolic links are not allowed in a bundle")
        if path.is_file() and rel != MANIFEST:
            files[rel] = path
    return files


def _unsigned(raw: dict[str, object]) -> dict[str, object]:
    return {name: value for name, value in raw.items() if name != "signature"}


def sign_bundle(root: Path, manifest: BundleManifest, key: Ed25519PrivateKey) -> BundleManifest:
    """Hash every file under ``root``, then write ``manifest`` with the hashes and the signature as
    ``manifest.json``; return the signed manifest. A file not on :data:`ALLOWED_FILES` is refused, unsigned."""
    signer = SignerInfo(key_id=key_id(key.public_key()),
                        public_key=base64.b64encode(public_key_bytes(key.public_key())).decode("ascii"))
    files = _bundle_files(root)
    check_allowed_files(files)
    unsigned = replace(manifest, format_version=BUNDLE_FORMAT_VERSION, signer=signer, signature=None,
                       files={rel: sha256_file(path) for rel, path in files.items()})
    signature = sign(key, SIGNATURE_CONTEXT, canonical_json(unsigned.unsigned_json()))
    signed = replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))
    atomic_write(root / MANIFEST, json.dumps(signed.to_json(), indent=2, sort_keys=True) + "\n")
    return signed


def _read_manifest(root: Path) -> dict[str, object]:
    path = root / MANIFEST
    if not path.is_file():
        raise MissingFileError(MANIFEST, "the bundle has no manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedManifestError(MANIFEST, f"not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise MalformedManifestError(MANIFEST, "the manifest is not a JSON object")
    return manifest


def verify_bundle_dir(root: Path, trusted_key: Ed25519PublicKey) -> VerifiedBundle:
    """Verify a bundle directory against the coordinator's public key; raise a :class:`BundleError` if not."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(str(root), "no such bundle directory")
    raw = _read_manifest(root)
    version = raw.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise UnsupportedFormatError(MANIFEST, f"unsupported format version {version!r} (supported: 1)")
    try:
        manifest = BundleManifest.from_json(raw, "manifest")
    except DocumentError as error:
        raise MalformedManifestError(MANIFEST, str(error)) from error
    if manifest.signer is None or manifest.signer.key_id != key_id(trusted_key):
        raise UnknownKeyError(
            MANIFEST, f"signed by unknown key {manifest.signer.key_id if manifest.signer else None!r}, "
            f"expected the coordinator key {key_id(trusted_key)}"
        )
    try:
        signature = base64.b64decode(manifest.signature or "", validate=True)
        verify(trusted_key, signature, SIGNATURE_CONTEXT, canonical_json(_unsigned(raw)))
    except (SignatureError, ValueError) as error:
        raise BadSignatureError(MANIFEST, "the manifest signature does not verify") from error

    listed = manifest.files
    present = _bundle_files(root)
    for rel in sorted(listed):
        if rel not in present:
            raise MissingFileError(rel, "listed in the manifest but missing from the bundle")
    for rel in sorted(present):
        if rel not in listed:
            raise ExtraFileError(rel, "present in the bundle but not listed in the manifest")
    for rel, expected in sorted(listed.items()):
        if sha256_file(present[rel]) != expected:
            raise TamperedFileError(rel, "sha256 does not match the manifest: the file was changed")
    check_allowed_files(listed)  # even correctly signed: a loader must never meet a pickle or a module
    try:
        spec = AdapterSpec.load(root / ADAPTER_SPEC_FILE)
    except AdapterSpecError as error:
        raise MalformedManifestError(ADAPTER_SPEC_FILE, str(error)) from error
    if spec.digest() != manifest.adapter.spec_sha256:
        raise MalformedManifestError(ADAPTER_SPEC_FILE, "adapter spec digest differs from the manifest's")
    return VerifiedBundle(root, manifest, spec, sha256_hex(canonical_json(raw)))


def pack_bundle(root: Path, tar_path: Path) -> Path:
    """Write one deterministic, uncompressed ``.tar`` of a bundle directory."""
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                info.mode = 0o644
                with open(path, "rb") as stream:
                    tar.addfile(info, stream)
    os.replace(tmp, tar_path)
    return tar_path


def unpack_bundle(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle ``.tar`` safely: regular files only, no absolute paths, no ``..``, no links."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise ExtraFileError(member.name, "only regular files are allowed in a bundle archive")
            tar.extractall(dest, filter="data")
    except tarfile.TarError as error:
        raise MalformedManifestError(str(tar_path), f"not a readable tar archive: {error}") from error
    return dest


def verify_bundle(path: Path, trusted_key: Ed25519PublicKey, extract_to: Path | None = None) -> VerifiedBundle:
    """Verify a bundle directory, or a ``.tar`` of one (extracted into ``extract_to`` or a temporary dir)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        dest = extract_to if extract_to is not None else Path(tempfile.mkdtemp(prefix="offsite-bundle-"))
        return verify_bundle_dir(unpack_bundle(path, dest), trusted_key)
    return verify_bundle_dir(path, trusted_key)
