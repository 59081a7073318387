"""Signed bundles: build, verify, and every way verification must refuse."""

from __future__ import annotations

import base64
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from coordinator.bundles import build_bundle, state_dict_digest
from emulator.loading import embedded_model_path
from emulator.split import SplitConfig
from protos import bundle as B
from protos.crypto import canonical_json, sha256_file, sign
from protos.manifests import BundleManifest
from tests.models import tiny_model


@pytest.fixture(scope="module")
def coordinator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, coordinator_key: Ed25519PrivateKey) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "gpt2-bundle"
    full = tiny_model("gpt2")
    build_bundle(full, str(embedded_model_path()), "tiny-gpt2", SplitConfig(1, 1, 2), out, coordinator_key,
                 task="causal-lm")
    return out


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def test_a_fresh_bundle_verifies(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    verified = B.verify_bundle(bundle, coordinator_key.public_key())
    manifest = verified.manifest
    assert manifest.format_version == 1
    assert manifest.base_model.weights_sha256 == state_dict_digest(tiny_model("gpt2"))
    assert manifest.compression.kept_middle == [1, 4]
    assert [e.full_index for e in manifest.layer_map] == [0, 1, 4, 5]
    assert set(manifest.files) >= {"emulator/config.json", "emulator/model.safetensors",
                                   "adapter/adapter_spec.json", "adapter/adapter.safetensors"}
    assert any(name.startswith("tokenizer/") for name in manifest.files)
    weights = load_file(str(verified.adapter_weights))
    assert sorted(weights) == sorted(verified.adapter_spec.names)
    assert {int(n.split(".")[2]) for n in weights} == {0, 5}


def test_a_changed_byte_in_any_file_is_named(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in sorted(manifest["files"]):
        path = bundle / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(B.TamperedFileError) as error:
            B.verify_bundle(bundle, coordinator_key.public_key())
        assert error.value.path == rel and rel in str(error.value)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_missing_file_is_named(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    (bundle / "emulator" / "config.json").unlink()
    with pytest.raises(B.MissingFileError, match="emulator/config.json"):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_missing_manifest_is_named(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    (bundle / "manifest.json").unlink()
    with pytest.raises(B.MissingFileError, match="manifest.json"):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_an_extra_file_is_named(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    (bundle / "emulator" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle smuggled in
    with pytest.raises(B.ExtraFileError, match="emulator/pytorch_model.bin"):
        B.verify_bundle(bundle, coordinator_key.public_key())


@pytest.mark.parametrize("rel", ["emulator/pytorch_model.bin", "tokenizer/x.py", "emulator/modeling_x.py"])
def test_a_listed_and_signed_disallowed_file_is_named(bundle: Path, coordinator_key: Ed25519PrivateKey,
                                                      rel: str) -> None:
    (bundle / rel).write_bytes(b"\x80\x04K\x01.")  # a pickle, or code a loader might import
    with pytest.raises(B.DisallowedFileError, match=rel):  # the coordinator's own signing refuses it...
        B.sign_bundle(bundle, _fields(bundle), coordinator_key)
    path = bundle / "manifest.json"  # ...and a manifest that lists it, really signed by that key, fails to verify
    manifest = json.loads(path.read_text())
    manifest["files"][rel] = sha256_file(bundle / rel)
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    manifest["signature"] = base64.b64encode(sign(coordinator_key, B.SIGNATURE_CONTEXT,
                                                  canonical_json(unsigned))).decode()
    path.write_text(json.dumps(manifest))
    with pytest.raises(B.DisallowedFileError, match=rel) as error:
        B.verify_bundle(bundle, coordinator_key.public_key())
    assert error.value.path == rel


def test_an_edited_manifest_fails_its_signature(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["compression"]["keep"] = 4
    path.write_text(json.dumps(manifest))
    with pytest.raises(B.BadSignatureError, match="manifest.json"):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_garbage_signature_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["signature"] = "not base64!"
    path.write_text(json.dumps(manifest))
    with pytest.raises(B.BadSignatureError):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_manifest_from_an_unknown_key_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    # Re-signed, consistently, by someone else: valid under their key, unknown to the data owner.
    B.sign_bundle(bundle, _fields(bundle), Ed25519PrivateKey.generate())
    with pytest.raises(B.UnknownKeyError, match="unknown key"):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_signature_by_another_key_under_our_key_id_is_refused(bundle: Path,
                                                                 coordinator_key: Ed25519PrivateKey) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    forged = sign(Ed25519PrivateKey.generate(), B.SIGNATURE_CONTEXT, canonical_json(unsigned))
    manifest["signature"] = base64.b64encode(forged).decode()
    path.write_text(json.dumps(manifest))
    with pytest.raises(B.BadSignatureError):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_an_unsupported_format_version_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    fields = _fields(bundle)
    B.sign_bundle(bundle, fields, coordinator_key)
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(B.UnsupportedFormatError, match="unsupported format version 2"):
        B.verify_bundle(bundle, coordinator_key.public_key())


def test_a_tar_round_trips(bundle: Path, coordinator_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    tar = B.pack_bundle(bundle, tmp_path / "bundle.tar")
    again = B.pack_bundle(bundle, tmp_path / "again.tar")
    assert tar.read_bytes() == again.read_bytes()  # deterministic
    verified = B.verify_bundle(tar, coordinator_key.public_key(), extract_to=tmp_path / "unpacked")
    assert verified.digest == B.verify_bundle(bundle, coordinator_key.public_key()).digest


def test_a_tar_with_a_link_or_escape_is_refused(tmp_path: Path, coordinator_key: Ed25519PrivateKey) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("emulator/config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(B.ExtraFileError, match="only regular files"):
        B.verify_bundle(evil, coordinator_key.public_key(), extract_to=tmp_path / "x")
    escape = tmp_path / "escape.tar"
    with tarfile.open(escape, "w") as tar:
        data = tmp_path / "payload"
        data.write_text("x")
        tar.add(data, arcname="../../escaped")
    with pytest.raises(B.BundleError):
        B.verify_bundle(escape, coordinator_key.public_key(), extract_to=tmp_path / "y")
    assert not (tmp_path.parent / "escaped").exists()


def test_building_over_an_existing_bundle_needs_force(built: Path, coordinator_key: Ed25519PrivateKey) -> None:
    with pytest.raises(FileExistsError, match="set force to replace it"):
        build_bundle(tiny_model("gpt2"), str(embedded_model_path()), "x", SplitConfig(1, 1, 2), built,
                     coordinator_key)


def _fields(bundle: Path) -> BundleManifest:
    manifest = BundleManifest.from_json(json.loads((bundle / "manifest.json").read_text()))
    return replace(manifest, signature=None, signer=None, files={})
