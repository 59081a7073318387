"""`offsite-coordinator deploy init`: the CA, certificates, keys, approved owners and configs a deployment needs,
each private key 0600 and each owner's directory holding only that owner's keys."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.deploy import SERVER_NAMES, init_deployment
from coordinator.errors import InvalidSettingError
from coordinator.federation import FederationSettings
from coordinator.storage import Storage
from protos import crypto
from protos.errors import ExitCode

OWNER_FILES = {"owner.key", "owner.pub", "supernode.key", "supernode.pub", "ca.crt", "coordinator.pub",
               "trusted-apps.json"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "deploy"
    result = CliRunner().invoke(app, ["deploy", "init", "--out", str(out), "--owners", "3",
                                      "--hostname", "offsite.example.org"])
    assert result.exit_code == 0, result.output
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_private(deployed: Path) -> None:
    keys = sorted(p for p in deployed.rglob("*.key"))
    assert {p.relative_to(deployed).as_posix() for p in keys} >= {
        "ca/ca.key", "coordinator/keys/coordinator.key", "coordinator/tls/coordinator.key",
        "superlink/superlink.key", "owner-0/owner.key", "owner-0/supernode.key"}
    for key in keys:
        assert mode(key) == 0o600, key
    assert mode(deployed / "ca") == 0o700
    assert list((deployed / "ca").iterdir()) == [deployed / "ca" / "ca.key"]  # the CA certificate lives in certs/


def test_owner_directories_hold_only_their_own_keys(deployed: Path) -> None:
    owners = sorted(p for p in deployed.iterdir() if p.name.startswith("owner-"))
    assert [p.name for p in owners] == ["owner-0", "owner-1", "owner-2"]
    ca = (deployed / "certs" / "ca.crt").read_bytes()
    coordinator_pub = (deployed / "coordinator" / "keys" / "coordinator.pub").read_bytes()
    secrets: dict[bytes, str] = {}
    for owner in owners:
        assert {p.name for p in owner.iterdir()} == OWNER_FILES, owner
        assert (owner / "ca.crt").read_bytes() == ca
        assert (owner / "coordinator.pub").read_bytes() == coordinator_pub
        assert (owner / "trusted-apps.json").read_bytes() == (owners[0] / "trusted-apps.json").read_bytes()
        for name in ("owner.key", "supernode.key"):
            secret = (owner / name).read_bytes()
            assert secret not in secrets, f"{owner.name}/{name} is also {secrets.get(secret)}"
            secrets[secret] = f"{owner.name}/{name}"
        assert (deployed / "supernodes" / f"{owner.name}.pub").read_bytes() == (owner / "supernode.pub").read_bytes()


def test_supernode_keys_are_what_flower_reads(deployed: Path) -> None:
    """ECDSA on a NIST curve in OpenSSH form: what flower-supernode --auth-supernode-private-key and
    flwr supernode register load (with Flower's own loaders)."""
    owner = deployed / "owner-0"
    private = load_ssh_private_key((owner / "supernode.key").read_bytes(), None)
    public = load_ssh_public_key((owner / "supernode.pub").read_bytes())
    assert private.public_key() == public
    assert try_load_public_key(owner / "supernode.pub")


def test_server_certificates_chain_to_the_ca_with_every_name(deployed: Path) -> None:
    ca = x509.load_pem_x509_certificate((deployed / "certs" / "ca.crt").read_bytes())
    for path in (deployed / "superlink" / "superlink.crt", deployed / "coordinator" / "tls" / "coordinator.crt"):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(names.get_values_for_type(x509.DNSName))
        ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
        assert {"offsite.example.org", "coordinator", "superlink", "localhost"} <= dns, path
        assert "127.0.0.1" in ips
        assert set(SERVER_NAMES) <= dns | ips


def test_coordinator_state_has_the_owners_approved(deployed: Path) -> None:
    storage = Storage.open(deployed / "coordinator" / "state")
    try:
        owners = {o.owner_id: o for o in storage.store.owners()}
    finally:
        storage.close()
    for index in range(3):
        key = crypto.load_public_key(deployed / f"owner-{index}" / "owner.pub")
        owner = owners.pop(crypto.key_id(key))
        assert owner.status == "approved" and crypto.public_key_bytes(owner.public_key) == crypto.public_key_bytes(key)
    assert not owners
    assert crypto.load_private_key(deployed / "coordinator" / "keys" / "coordinator.key")


def test_run_config_flower_config_and_register_script(deployed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = FederationSettings.from_config(tomllib.loads((deployed / "run.toml").read_text()))
    assert settings.min_replies == 3 and settings.num_rounds == 2 and settings.job_id == "job-1"
    assert settings.coordinator == "coordinator:50051" and not settings.insecure and settings.root_cert is not None
    # the ServerApp's admin key is registered with the coordinator's service; it holds no coordinator key
    admin = crypto.load_private_key(deployed / "serverapp" / "admin.key").public_key()
    assert mode(deployed / "serverapp" / "admin.key") == 0o600
    registered = deployed / "coordinator" / "state" / "admin" / f"{crypto.key_id(admin)}.pub"
    assert crypto.public_key_bytes(crypto.load_public_key(registered)) == crypto.public_key_bytes(admin)
    assert sorted(p.name for p in (deployed / "serverapp").iterdir()) == ["admin.key", "admin.pub", "coordinator.pub"]
    monkeypatch.setenv("FLWR_HOME", str(deployed / "flwr"))
    connection = read_superlink_connection("compose")
    assert connection.address == "127.0.0.1:8000" and not connection.insecure
    assert connection.root_certificates == str((deployed / "certs" / "ca.crt").resolve())
    assert read_superlink_connection(None).name == "compose"  # the default connection
    script = (deployed / "register-supernodes.sh").read_text()
    assert mode(deployed / "register-supernodes.sh") & 0o100
    for index in range(3):
        assert f'flwr supernode register "$here/supernodes/owner-{index}.pub" compose' in script


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    runner = CliRunner()
    assert runner.invoke(app, ["deploy", "init", "--out", str(out), "--owners", "1"]).exit_code == 0
    first = (out / "owner-0" / "owner.key").read_bytes()
    again = runner.invoke(app, ["deploy", "init", "--out", str(out), "--owners", "1"])
    assert again.exit_code == ExitCode.BAD_INPUT and "--force" in again.output
    assert (out / "owner-0" / "owner.key").read_bytes() == first
    forced = runner.invoke(app, ["deploy", "init", "--out", str(out), "--owners", "2", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "owner-0" / "owner.key").read_bytes() != first and (out / "owner-1").is_dir()


def test_bad_owner_count_names_the_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "init", "--out", str(tmp_path / "d"), "--owners", "0"])
    assert result.exit_code == ExitCode.BAD_INPUT and "--owners" in result.output
    assert not (tmp_path / "d").exists()
    with pytest.raises(FileExistsError):
        init_deployment(tmp_path, 1)
    (tmp_path / "precious.txt").write_text("not a deployment")
    with pytest.raises(InvalidSettingError, match="not a deployment"):
        init_deployment(tmp_path, 1, force=True)  # --force replaces only what deploy init wrote
    assert (tmp_path / "precious.txt").exists()
