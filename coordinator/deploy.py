"""What a deployment needs before ``docker compose up``: a private CA, TLS certificates for the coordinator's gRPC
service and the Flower SuperLink, the coordinator's signing key and state with the owners approved, and one
directory per data owner holding only that owner's keys (its Ed25519 signing key and its Flower SuperNode
authentication key) plus the public files every owner needs (``ca.crt``, ``coordinator.pub``).

``init_deployment`` writes the layout below; ``docker-compose.yml`` mounts parts of it, never the whole::

    ca/ca.key                   the CA's private key (0600): mounted by no service; keep it offline
    certs/ca.crt                the CA certificate (public)
    coordinator/tls/            coordinator.crt, coordinator.key: the coordinator's gRPC service
    coordinator/keys/           coordinator.key (0600), coordinator.pub: the coordinator's signing key pair
    coordinator/state/          the coordinator's state: owners registered and approved, the admin key's public half
                                in ``state/admin/`` (the only key its admin calls OpenRound/AggregateRound accept)
    coordinator/checkpoints/    the round checkpoints the coordinator's service writes (``serve --checkpoints``)
    serverapp/                  admin.key (0600), admin.pub, coordinator.pub: all the ServerApp (in the SuperLink
                                container) holds, besides ``certs/ca.crt``
    superlink/                  superlink.crt, superlink.key: the SuperLink's TLS certificate
    owner-N/                    owner.key (0600), owner.pub, supernode.key (0600), supernode.pub, ca.crt,
                                coordinator.pub, trusted-apps.json (the app bundles the coordinator signed)
    supernodes/owner-N.pub      the SuperNode public keys to register (``flwr supernode register``)
    flwr/config.toml            ``FLWR_HOME`` for ``flwr``: the SuperLink connection, trusting ``certs/ca.crt``
    register-supernodes.sh      registers every key of ``supernodes/`` with the running SuperLink
    run.toml                    the ServerApp's run config (``flwr run . NAME --run-config run.toml``)
"""

from __future__ import annotations

import datetime
import ipaddress
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.app_signing import app_name, build_app
from coordinator.errors import InvalidSettingError
from coordinator.paths import PUBLIC_KEY_FILE, init_admin_key, init_keys
from coordinator.storage import Storage
from protos import crypto
from protos.app_approval import TRUSTED_APPS_FILE, TrustedApps, approve_app
from protos.errors import OutputExistsError
from protos.files import atomic_write

SERVER_NAMES = ("coordinator", "superlink", "localhost", "127.0.0.1")  # SANs of every server certificate
CERT_DAYS = 365
# Where docker-compose.yml mounts the deployment's parts inside the containers; run.toml names these paths.
CONTAINER_STATE_DIR = "/coordinator/state"
CONTAINER_CHECKPOINT_DIR = "/coordinator/checkpoints"
CONTAINER_SERVERAPP_DIR = "/serverapp"  # the superlink container: admin.key, coordinator.pub
CONTAINER_CA_CERT = "/certs/ca.crt"
COORDINATOR_ADDRESS = "coordinator:50051"
SUPERLINK_PORT = 8000
CONNECTION_NAME = "compose"


def pem_certificate(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "offsite"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "offsite deployment CA", days: int = CERT_DAYS) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP384R1())
        now = datetime.datetime.now(datetime.UTC)
        name = _name(common_name)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    def issue_server(self, common_name: str, names: Sequence[str],
                     days: int = CERT_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A TLS server certificate (and its new key) valid for every DNS name or IP address in ``names``."""
        if not names:
            raise InvalidSettingError("a server certificate needs at least one {hostname}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        unique = list(dict.fromkeys(names))
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([_san(n) for n in unique]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert, key


def supernode_auth_key() -> tuple[bytes, bytes]:
    """A Flower SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line), ECDSA on a NIST
    curve, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_server_tls(ca: CertificateAuthority, cert_path: Path, key_path: Path, names: Sequence[str]) -> None:
    cert, key = ca.issue_server(names[0], names)
    atomic_write(key_path, pem_private_key(key), mode=0o600)
    atomic_write(cert_path, pem_certificate(cert))


@dataclass(frozen=True)
class OwnerFiles:
    directory: Path
    owner_id: str

    @property
    def signing_key(self) -> Path:
        return self.directory / "owner.key"

    @property
    def supernode_key(self) -> Path:
        return self.directory / "supernode.key"

    @property
    def supernode_pub(self) -> Path:
        return self.directory / "supernode.pub"


@dataclass(frozen=True)
class Deployment:
    root: Path
    owners: list[OwnerFiles] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.root / "certs" / "ca.crt"

    @property
    def state_dir(self) -> Path:
        return self.root / "coordinator" / "state"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"


def _register_script(owners: Sequence[OwnerFiles]) -> str:
    lines = ["#!/bin/sh",
             "# Register each data owner's SuperNode key with the running SuperLink (flower-superlink",
             "# --enable-supernode-auth refuses any SuperNode whose key is not registered). Run from anywhere.",
             "set -eu", 'here="$(cd "$(dirname "$0")" && pwd)"', 'export FLWR_HOME="$here/flwr"']
    for owner in owners:
        lines.append(f'flwr supernode register "$here/supernodes/{owner.directory.name}.pub" {CONNECTION_NAME} '
                     f"--name {shlex.quote(owner.directory.name)}")
    return "\n".join(lines) + "\n"


def _run_config(job_id: str, rounds: int, min_replies: int) -> str:
    return "\n".join([
        "# The ServerApp's run config: flwr run . " + CONNECTION_NAME + " --run-config run.toml",
        "# Paths are inside the superlink container (docker-compose.yml mounts them there).",
        f'job-id = "{job_id}"', f'coordinator = "{COORDINATOR_ADDRESS}"',
        f'admin-key = "{CONTAINER_SERVERAPP_DIR}/admin.key"', f'root-cert = "{CONTAINER_CA_CERT}"',
        f'coordinator-key = "{CONTAINER_SERVERAPP_DIR}/{PUBLIC_KEY_FILE}"', f"num-server-rounds = {rounds}",
        f"min-replies = {min_replies}",
    ]) + "\n"


def init_deployment(out: Path, owners: int, *, hostname: str = "localhost", job_id: str = "job-1",
                    rounds: int = 2, app: Path | None = None, force: bool = False) -> Deployment:
    """Write everything ``docker-compose.yml`` mounts into ``out`` (see the module's docstring).

    ``out`` must not exist unless ``force``; then it is replaced whole (old keys are gone), and only if it is empty
    or an earlier deployment (it holds ``certs/ca.crt``). With ``app`` (a Flower app directory), each owner's
    ``trusted-apps.json`` approves that app's bundle; without, it approves none until ``app sign``."""
    if owners < 1:
        raise InvalidSettingError(f"{{owners}} must be >= 1, got {owners}")
    if rounds < 1:
        raise InvalidSettingError(f"{{rounds}} must be >= 1, got {rounds}")
    out = Path(out)
    if out.exists():
        if not force:
            raise OutputExistsError(out)
        if any(out.iterdir()) and not (out / "certs" / "ca.crt").is_file():
            raise InvalidSettingError(f"{out} is not a deployment (no certs/ca.crt): not replacing it ({{force}})")
        shutil.rmtree(out)
    fab = build_app(app) if app is not None else None  # before anything is written: a bad --app leaves nothing
    out.mkdir(parents=True)
    names = [hostname, *SERVER_NAMES]

    ca = CertificateAuthority.create()
    atomic_write(out / "ca" / "ca.key", pem_private_key(ca.key), mode=0o600)
    ca_pem = pem_certificate(ca.cert)
    atomic_write(out / "certs" / "ca.crt", ca_pem)
    write_server_tls(ca, out / "coordinator" / "tls" / "coordinator.crt",
                     out / "coordinator" / "tls" / "coordinator.key", ["coordinator", *names])
    write_server_tls(ca, out / "superlink" / "superlink.crt", out / "superlink" / "superlink.key",
                     ["superlink", *names])
    coordinator_key, coordinator_pub = init_keys(out / "coordinator" / "keys")
    trusted = TrustedApps()
    if fab is not None and app is not None:
        trusted = TrustedApps(approvals=[approve_app(crypto.load_private_key(coordinator_key), fab, app_name(app))])
    (out / "coordinator" / "checkpoints" / job_id).mkdir(parents=True)
    init_admin_key(out / "coordinator" / "state", out / "serverapp" / "admin.key")
    atomic_write(out / "serverapp" / PUBLIC_KEY_FILE, coordinator_pub.read_bytes())

    deployment = Deployment(out)
    storage = Storage.open(out / "coordinator" / "state")
    try:
        for index in range(owners):
            directory = out / f"owner-{index}"
            signing_key = crypto.generate_signing_key()
            crypto.write_private_key(signing_key, directory / "owner.key")
            crypto.write_public_key(signing_key.public_key(), directory / "owner.pub")
            node_private, node_public = supernode_auth_key()
            atomic_write(directory / "supernode.key", node_private, mode=0o600)
            atomic_write(directory / "supernode.pub", node_public)
            atomic_write(directory / "ca.crt", ca_pem)
            atomic_write(directory / PUBLIC_KEY_FILE, coordinator_pub.read_bytes())
            trusted.save(directory / TRUSTED_APPS_FILE)
            atomic_write(out / "supernodes" / f"owner-{index}.pub", node_public)
            owner_id = crypto.key_id(signing_key.public_key())
            storage.store.add_owner(owner_id, signing_key.public_key(), approved=True)
            deployment.owners.append(OwnerFiles(directory, owner_id))
    finally:
        storage.close()

    atomic_write(out / "flwr" / "config.toml", "\n".join([
        "[superlink]", f'default = "{CONNECTION_NAME}"', "", f"[superlink.{CONNECTION_NAME}]",
        f'address = "127.0.0.1:{SUPERLINK_PORT}"', f'root-certificates = "{(out / "certs" / "ca.crt").resolve()}"',
    ]) + "\n")
    script = atomic_write(out / "register-supernodes.sh", _register_script(deployment.owners))
    script.chmod(0o755)
    atomic_write(out / "run.toml", _run_config(job_id, rounds, owners))
    return deployment
