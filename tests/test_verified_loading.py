"""Loading only what was verified: the bundle allowlist, safe emulator loading, private key files and passphrase-wrapped
delta keys."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from typer.testing import CliRunner

from coordinator.bundles import build_bundle
from coordinator.cli import app as coordinator_app
from coordinator.keyring import CURRENT, KEYS_DIR, PASSPHRASE_ENV, DeltaKeyFileError, DeltaKeyring
from emulator.loading import UnsafeModelError, embedded_model_path
from emulator.quantize import load_emulator
from emulator.split import SplitConfig
from protos import bundle as B
from protos.crypto import KeyFileError, canonical_json, sha256_hex, sign, write_private_key
from protos.delta_keys import x25519_key_id, x25519_private_bytes
from protos.errors import ExitCode, exit_code_for
from protos.files import atomic_write
from protos.manifests import BundleManifest
from tests.models import tiny_model

DISALLOWED = ["emulator/pytorch_model.bin", "tokenizer/x.py", "emulator/modeling_x.py", "adapter/adapter.pkl",
              "tokenizer/tokenizer.model", "README.md", "emulator/sub/model.safetensors", "tokenizer/.hidden.json"]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def coordinator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, coordinator_key: Ed25519PrivateKey) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "gpt2-bundle"
    build_bundle(tiny_model("gpt2"), str(embedded_model_path()), "tiny-gpt2", SplitConfig(1, 1, 2), out,
                 coordinator_key, task="causal-lm")
    return out


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def _fields(bundle: Path) -> BundleManifest:
    manifest = BundleManifest.from_json(json.loads((bundle / B.MANIFEST).read_text()))
    return replace(manifest, signature=None, signer=None, files={})


def _sign_by_hand(bundle: Path, key: Ed25519PrivateKey, extra: dict[str, bytes]) -> None:
    """Add ``extra`` files and list them in a manifest the coordinator key really signs (bypassing sign_bundle)."""
    path = bundle / B.MANIFEST
    raw = json.loads(path.read_text())
    for rel, data in extra.items():
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(data)
        raw["files"][rel] = sha256_hex(data)
    raw.pop("signature")
    raw["signature"] = base64.b64encode(sign(key, B.SIGNATURE_CONTEXT, canonical_json(raw))).decode("ascii")
    path.write_text(json.dumps(raw))


def _edit_config(bundle: Path, key: Ed25519PrivateKey, **fields: object) -> None:
    path = bundle / "emulator" / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    B.sign_bundle(bundle, _fields(bundle), key)


# -- the bundle allowlist ---------------------------------------------------------------------------------------

def test_the_allowlist_admits_what_bundles_hold(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    files = [path.relative_to(bundle).as_posix() for path in bundle.rglob("*") if path.is_file()]
    assert all(B.is_allowed_file(rel) for rel in files), files
    assert not any(B.is_allowed_file(rel) for rel in DISALLOWED)
    # sharded weights and a chat template: what save_pretrained writes for bigger models of the same families
    shutil.copy(bundle / "emulator" / "model.safetensors", bundle / "emulator" / "model-00001-of-00001.safetensors")
    (bundle / "emulator" / "model.safetensors.index.json").write_text("{}")
    (bundle / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    B.sign_bundle(bundle, _fields(bundle), coordinator_key)
    B.verify_bundle(bundle, coordinator_key.public_key())


@pytest.mark.parametrize("rel", DISALLOWED)
def test_signing_refuses_a_disallowed_file(bundle: Path, coordinator_key: Ed25519PrivateKey, rel: str) -> None:
    before = (bundle / B.MANIFEST).read_bytes()
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(B.DisallowedFileError, match=re.escape(rel)) as error:
        B.sign_bundle(bundle, _fields(bundle), coordinator_key)
    assert error.value.path == rel
    assert (bundle / B.MANIFEST).read_bytes() == before  # nothing signed


@pytest.mark.parametrize("rel", DISALLOWED)
def test_a_correctly_signed_bundle_with_a_disallowed_file_fails_verification(
        bundle: Path, coordinator_key: Ed25519PrivateKey, rel: str) -> None:
    _sign_by_hand(bundle, coordinator_key, {rel: b"\x80\x04K\x01."})
    with pytest.raises(B.DisallowedFileError) as error:
        B.verify_bundle(bundle, coordinator_key.public_key())
    assert error.value.path == rel and rel in str(error.value)
    assert exit_code_for(error.value) == ExitCode.FAILED


def test_a_signed_tar_with_a_pickle_fails_verification(bundle: Path, coordinator_key: Ed25519PrivateKey,
                                                       tmp_path: Path) -> None:
    _sign_by_hand(bundle, coordinator_key, {"emulator/pytorch_model.bin": b"\x80\x04K\x01."})
    tar = B.pack_bundle(bundle, tmp_path / "bundle.tar")
    with pytest.raises(B.DisallowedFileError, match="emulator/pytorch_model.bin"):
        B.verify_bundle(tar, coordinator_key.public_key(), extract_to=tmp_path / "unpacked")


# -- loading the emulator ---------------------------------------------------------------------------------------

def test_a_config_with_auto_map_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    _edit_config(bundle, coordinator_key, auto_map={"AutoModelForCausalLM": "modeling_x.EvilForCausalLM"})
    verified = B.verify_bundle(bundle, coordinator_key.public_key())  # signed, on the allowlist: still refused
    for source in (verified, bundle):
        with pytest.raises(UnsafeModelError, match="auto_map") as error:
            load_emulator(source)
        assert error.value.field == "emulator/config.json auto_map"


@pytest.mark.parametrize("class_name", ["GPTJForCausalLM",  # a real transformers class, not a registered family
                                        "AutoModelForCausalLM",  # not a model class
                                        "BertModel",  # registered, but not the config's model_type
                                        "GPT2Tokenizer",  # not a model head
                                        "NoSuchForCausalLM", "os.system"])
def test_a_model_class_outside_the_registry_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey,
                                                        class_name: str) -> None:
    fields = _fields(bundle)
    B.sign_bundle(bundle, replace(fields, base_model=replace(fields.base_model, class_name=class_name)),
                  coordinator_key)
    verified = B.verify_bundle(bundle, coordinator_key.public_key())
    for source in (verified, bundle):
        with pytest.raises(UnsafeModelError) as error:
            load_emulator(source)
        assert error.value.field == "manifest.json base_model.class" and class_name in str(error.value)


@pytest.mark.parametrize(("fields", "field"), [
    ({"model_type": "gptj", "architectures": ["GPTJForCausalLM"]}, "emulator/config.json model_type"),
    ({"architectures": ["GPTJForCausalLM"]}, "emulator/config.json architectures"),
    ({"architectures": ["BertModel"]}, "emulator/config.json architectures"),
])
def test_a_config_outside_the_registry_is_refused(bundle: Path, coordinator_key: Ed25519PrivateKey,
                                                  fields: dict[str, object], field: str) -> None:
    _edit_config(bundle, coordinator_key, **fields)
    with pytest.raises(UnsafeModelError) as error:
        load_emulator(B.verify_bundle(bundle, coordinator_key.public_key()))
    assert error.value.field == field


def test_the_emulator_loads_only_from_the_emulator_dir(bundle: Path, coordinator_key: Ed25519PrivateKey) -> None:
    fields = _fields(bundle)
    B.sign_bundle(bundle, replace(fields, emulator=replace(fields.emulator, dir="tokenizer")), coordinator_key)
    with pytest.raises(UnsafeModelError) as error:
        load_emulator(B.verify_bundle(bundle, coordinator_key.public_key()))
    assert error.value.field == "manifest.json emulator.dir"


def test_an_unverified_path_gets_the_allowlist_too(bundle: Path) -> None:
    assert type(load_emulator(bundle)).__name__ == "GPT2LMHeadModel"  # the trusted caller's path still loads
    (bundle / "emulator" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(B.DisallowedFileError, match="emulator/pytorch_model.bin"):
        load_emulator(bundle)


# -- private key files --------------------------------------------------------------------------------------------

def test_a_private_key_is_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    before = mode_of(tmp_path)
    key_path = tmp_path / "keys" / "owner.key"
    write_private_key(Ed25519PrivateKey.generate(), key_path)
    assert mode_of(key_path) == 0o600
    assert mode_of(key_path.parent) == 0o700
    assert mode_of(tmp_path) == before  # a directory we did not create is left alone
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["owner.key"]  # no temporary file left


def test_a_stale_wide_temporary_file_never_widens_a_private_key(tmp_path: Path) -> None:
    key_path = tmp_path / "owner.key"
    stale = tmp_path / f".owner.key.tmp-{os.getpid()}"
    stale.write_bytes(b"left by a crash")
    os.chmod(stale, 0o644)
    write_private_key(Ed25519PrivateKey.generate(), key_path)
    assert mode_of(key_path) == 0o600
    assert not stale.exists()


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_atomic_write_creates_the_temporary_file_with_the_mode(tmp_path: Path, umask: int) -> None:
    seen: list[int] = []

    def writer(tmp: Path) -> None:
        seen.append(mode_of(tmp))  # the file exists, already private, before a byte is written
        with open(tmp, "wb") as out:
            out.write(b"secret")

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.key", writer, mode=0o600)
        atomic_write(tmp_path / "b.key", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert mode_of(tmp_path / "a.key") == mode_of(tmp_path / "b.key") == 0o600
    assert (tmp_path / "a.key").read_bytes() == b"secret"


def test_delta_keys_are_0600_in_a_0700_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    ring = DeltaKeyring(tmp_path)
    assert mode_of(ring.dir) == 0o700
    assert mode_of(ring.dir / f"{ring.current_id}.key") == 0o600
    os.chmod(ring.dir, 0o755)  # a keyring from before: tightened when opened
    DeltaKeyring(tmp_path)
    assert mode_of(ring.dir) == 0o700


# -- passphrase-wrapped delta keys --------------------------------------------------------------------------------

def test_a_passphrase_wrapped_delta_key_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ring = DeltaKeyring(tmp_path)
    kid = ring.current_id
    data = (ring.dir / f"{kid}.key").read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert x25519_private_bytes(X25519PrivateKey.generate()) not in data
    assert mode_of(ring.dir / f"{kid}.key") == 0o600
    assert x25519_key_id(DeltaKeyring(tmp_path).current().public_key()) == kid
    newer = ring.rotate()
    assert newer != kid and x25519_key_id(ring.get(kid).public_key()) == kid
    assert x25519_key_id(ring.current().public_key()) == newer


@pytest.mark.parametrize("passphrase", ["a wrong passphrase", None])
def test_a_wrong_or_missing_passphrase_is_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          passphrase: str | None) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ring = DeltaKeyring(tmp_path)
    path = ring.dir / f"{ring.current_id}.key"
    if passphrase is None:
        monkeypatch.delenv(PASSPHRASE_ENV)
    else:
        monkeypatch.setenv(PASSPHRASE_ENV, passphrase)
    with pytest.raises(DeltaKeyFileError) as error:
        ring.current()
    assert str(path) in str(error.value) and PASSPHRASE_ENV in str(error.value)
    assert isinstance(error.value, KeyFileError) and exit_code_for(error.value) == ExitCode.BAD_INPUT


def test_serve_with_a_wrong_passphrase_fails_with_the_file_named(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ring = DeltaKeyring(tmp_path / "state")
    monkeypatch.setenv(PASSPHRASE_ENV, "a wrong passphrase")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started before its delta key was checked")

    serve_module = importlib.import_module("coordinator.cli.serve")  # the package's ``serve`` is the command
    monkeypatch.setattr(serve_module, "start_server", never)  # a regression fails here, never blocks
    result = CliRunner().invoke(coordinator_app, ["serve", "--state", str(tmp_path / "state"), "--insecure",
                                                  "--port", "0"], terminal_width=400)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    output = "".join(result.output.split())  # the console wraps long paths
    assert f"{ring.dir}/{ring.current_id}.key".replace(" ", "") in output and PASSPHRASE_ENV in output
    assert "Traceback" not in result.output and not isinstance(result.exception, DeltaKeyFileError)


def test_a_legacy_raw_key_still_loads_beside_wrapped_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = X25519PrivateKey.generate()
    legacy_id = x25519_key_id(legacy.public_key())
    keys = tmp_path / KEYS_DIR
    keys.mkdir()
    (keys / f"{legacy_id}.key").write_bytes(x25519_private_bytes(legacy))
    (keys / CURRENT).write_text(legacy_id)
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ring = DeltaKeyring(tmp_path)
    assert x25519_private_bytes(ring.current()) == x25519_private_bytes(legacy)
    newer = ring.rotate()
    assert (keys / f"{newer}.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert x25519_private_bytes(ring.get(legacy_id)) == x25519_private_bytes(legacy)
    assert x25519_key_id(ring.current().public_key()) == newer


def test_a_malformed_delta_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    ring = DeltaKeyring(tmp_path)
    path = ring.dir / f"{ring.current_id}.key"
    path.write_bytes(b"not a key at all")
    with pytest.raises(DeltaKeyFileError, match=str(path)):
        ring.current()
