"""Owners' nodes run only app bundles the coordinator signed (``protos.app_approval``, ``client.app_runner``,
``offsite-client node start``). The deployment test runs the refusal against real SuperNodes; these check the
pieces: the digest deploy init signs is the digest ``flwr run`` uploads, and every way to fake an approval fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from typer.testing import CliRunner

from client.app_runner import COORDINATOR_KEY_ENV, TRUSTED_APPS_ENV, verify_fab
from client.cli import app as client_app
from coordinator.app_signing import sign_app
from coordinator.cli import app as coordinator_app
from coordinator.deploy import init_deployment
from protos import crypto
from protos.app_approval import AppApproval, TrustedApps, UntrustedAppError, approve_app, check_app
from protos.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
INTRUDER_APP = ROOT / "tests" / "apps" / "intruder_app"


@pytest.fixture(scope="module")
def fab() -> bytes:
    return bytes(build_fab_from_disk(ROOT))


def test_deploy_init_approves_the_bundle_flwr_run_uploads(tmp_path: Path, fab: bytes) -> None:
    deployment = init_deployment(tmp_path / "deploy", 2, app=ROOT)
    coordinator_pub = crypto.load_public_key(deployment.root / "owner-0" / "coordinator.pub")
    for owner in deployment.owners:
        trusted = TrustedApps.load(owner.directory / "trusted-apps.json")
        assert check_app(fab, trusted, coordinator_pub).fab_sha256 == crypto.sha256_hex(fab)
        with pytest.raises(UntrustedAppError, match="not signed by the coordinator"):
            check_app(bytes(build_fab_from_disk(INTRUDER_APP)), trusted, coordinator_pub)


def test_forged_tampered_and_foreign_approvals_are_refused(tmp_path: Path, fab: bytes) -> None:
    coordinator, stranger = crypto.generate_signing_key(), crypto.generate_signing_key()
    genuine = approve_app(coordinator, fab, "offsite")
    with pytest.raises(UntrustedAppError):  # one byte of the bundle changed
        check_app(fab[:-1] + bytes([fab[-1] ^ 1]), TrustedApps(approvals=[genuine]), coordinator.public_key())
    with pytest.raises(UntrustedAppError):  # signed, but by someone else
        check_app(fab, TrustedApps(approvals=[approve_app(stranger, fab, "offsite")]), coordinator.public_key())
    relabelled = AppApproval(fab_sha256=genuine.fab_sha256, name="something else", approved_at=genuine.approved_at,
                             signature=genuine.signature)
    with pytest.raises(UntrustedAppError):  # the name is signed too
        check_app(fab, TrustedApps(approvals=[relabelled]), coordinator.public_key())
    intruder = bytes(build_fab_from_disk(INTRUDER_APP))
    transplanted = AppApproval(fab_sha256=crypto.sha256_hex(intruder), name=genuine.name,
                               approved_at=genuine.approved_at, signature=genuine.signature)
    with pytest.raises(UntrustedAppError):  # a genuine signature moved onto another digest
        check_app(intruder, TrustedApps(approvals=[transplanted, genuine]), coordinator.public_key())
    assert check_app(fab, TrustedApps(approvals=[relabelled, genuine]), coordinator.public_key()) == genuine


def test_runner_refuses_without_its_files_or_with_a_bad_file(tmp_path: Path, fab: bytes,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUSTED_APPS_ENV, raising=False)
    with pytest.raises(UntrustedAppError, match=TRUSTED_APPS_ENV):
        verify_fab(fab)
    key = crypto.generate_signing_key()
    crypto.write_public_key(key.public_key(), tmp_path / "coordinator.pub")
    trusted = tmp_path / "trusted-apps.json"
    trusted.write_text(json.dumps({"approvals": [{"fab_sha256": "../../etc", "name": "x", "approved_at": "now",
                                                  "signature": "00"}]}))
    monkeypatch.setenv(TRUSTED_APPS_ENV, str(trusted))
    monkeypatch.setenv(COORDINATOR_KEY_ENV, str(tmp_path / "coordinator.pub"))
    with pytest.raises(UntrustedAppError, match="fab_sha256"):
        verify_fab(fab)
    with pytest.raises(UntrustedAppError, match="fab_sha256"):  # a malformed file is not silently rewritten
        sign_app(key, ROOT, [trusted])
    sign_app(key, ROOT, [tmp_path / "second.json"])
    trusted.unlink()
    (tmp_path / "second.json").rename(trusted)
    verify_fab(fab)


def test_app_sign_cli_and_node_start_dry_run(tmp_path: Path) -> None:
    deployment = init_deployment(tmp_path / "deploy", 1)  # no --app: nothing approved yet
    owner = deployment.owners[0].directory
    assert TrustedApps.load(owner / "trusted-apps.json").approvals == []
    signed = CliRunner().invoke(coordinator_app, [
        "app", "sign", "--app", str(ROOT), "--key", str(deployment.root / "coordinator" / "keys" / "coordinator.key"),
        str(owner / "trusted-apps.json")])
    assert signed.exit_code == 0, signed.output
    assert len(TrustedApps.load(owner / "trusted-apps.json").approvals) == 1
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "x", "label": 0}\n')
    started = CliRunner().invoke(client_app, [
        "node", "start", "--superlink", "link:8000", "--coordinator", "coord:50051", "--job", "job-7",
        "--train", str(train), "--dir", str(owner), "--dry-run"])
    assert started.exit_code == 0, started.output
    assert "--auth-supernode-private-key" in started.output and 'job-id="job-7"' in started.output
    (owner / "trusted-apps.json").unlink()
    refused = CliRunner().invoke(client_app, [
        "node", "start", "--superlink", "link:8000", "--coordinator", "coord:50051", "--job", "job-7",
        "--train", str(train), "--dir", str(owner), "--dry-run"])
    assert refused.exit_code == ExitCode.BAD_INPUT and "trusted-apps.json" in refused.output, refused.output
    bad_app = CliRunner().invoke(coordinator_app, [
        "app", "sign", "--app", str(tmp_path), "--key", str(deployment.root / "coordinator" / "keys" /
                                                             "coordinator.key"), str(owner / "trusted-apps.json")])
    assert bad_app.exit_code == ExitCode.BAD_INPUT and "--app" in bad_app.output, bad_app.output
