"""The owner's ``flwr-clientapp``: Flower's ClientApp process, refusing any app bundle the coordinator did not sign.

``offsite-client node start`` runs ``flower-supernode`` with a private directory first on its PATH in which
``flwr-clientapp`` is this module. The SuperNode hands every task to that command; here the FAB's digest is
checked against ``trusted-apps.json`` with the pinned ``coordinator.pub`` (``protos.app_approval``) before
Flower unpacks the FAB or imports any of its code. A refused task ends as Flower's error reply; the node keeps
running. Paths come from the environment the node set: ``OFFSITE_TRUSTED_APPS`` and ``OFFSITE_COORDINATOR_KEY``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from protos import crypto
from protos.app_approval import TrustedApps, UntrustedAppError, check_app

TRUSTED_APPS_ENV, COORDINATOR_KEY_ENV = "OFFSITE_TRUSTED_APPS", "OFFSITE_COORDINATOR_KEY"
log = logging.getLogger("offsite.app_runner")


def verify_fab(fab: bytes) -> None:
    """Raise UntrustedAppError unless the coordinator signed this FAB (files named by the environment)."""
    trusted, key = os.environ.get(TRUSTED_APPS_ENV), os.environ.get(COORDINATOR_KEY_ENV)
    if not trusted or not key:
        raise UntrustedAppError(f"set {TRUSTED_APPS_ENV} and {COORDINATOR_KEY_ENV}: no app runs unverified")
    try:
        coordinator_key = crypto.load_public_key(Path(key))
    except crypto.KeyFileError as error:
        raise UntrustedAppError(f"cannot read the coordinator's key: {error}") from error
    check_app(fab, TrustedApps.load(Path(trusted)), coordinator_key)


def main() -> None:
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    install = runtime.install_from_fab

    def install_verified(fab: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            verify_fab(fab)
        except UntrustedAppError as error:
            log.error("offsite: %s", error)
            raise
        return install(fab, *args, **kwargs)

    # run_clientapp looks the name up at call time: every FAB passes the check before it touches the disk.
    runtime.install_from_fab = install_verified  # type: ignore[assignment]
    flwr_clientapp()


if __name__ == "__main__":
    main()
