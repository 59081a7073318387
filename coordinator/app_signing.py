"""The coordinator approves the Flower app bundles owners' nodes may run (``protos.app_approval`` has the format).

A FAB is what ``flwr run APP`` uploads: Flower builds it from the app directory deterministically, so the digest
signed here is the digest the SuperNode later receives. Approvals are appended to ``trusted-apps.json`` files,
one per owner directory (each owner's node reads only its own copy).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.errors import InvalidSettingError
from protos.app_approval import AppApproval, TrustedApps, approve_app


def build_app(app_dir: Path) -> bytes:
    """The FAB ``flwr run app_dir`` would upload."""
    from flwr.cli.build import build_fab_from_disk

    pyproject = app_dir / "pyproject.toml"
    try:
        tool = tomllib.loads(pyproject.read_text()).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise InvalidSettingError(f"{{app}} {app_dir}: cannot read pyproject.toml ({error})") from error
    if "app" not in tool.get("flwr", {}):
        raise InvalidSettingError(f"{{app}} {app_dir}: pyproject.toml has no [tool.flwr.app]: not a Flower app")
    return bytes(build_fab_from_disk(app_dir.resolve()))


def app_name(app_dir: Path) -> str:
    project = tomllib.loads((app_dir / "pyproject.toml").read_text()).get("project", {})
    return f"{project.get('name', '?')} {project.get('version', '?')} ({app_dir.resolve().name})"


def sign_app(key: Ed25519PrivateKey, app_dir: Path, trusted_files: Sequence[Path]) -> AppApproval:
    """Approve the app at ``app_dir`` in each trusted-apps file (created when missing; one entry per digest)."""
    approval = approve_app(key, build_app(app_dir), app_name(app_dir))
    for path in trusted_files:
        trusted = TrustedApps.load(path) if path.exists() else TrustedApps()
        kept = [a for a in trusted.approvals if a.fab_sha256 != approval.fab_sha256]
        TrustedApps(approvals=[*kept, approval]).save(path)
    return approval
