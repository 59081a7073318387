"""The coordinator's Flower ServerApp (Message API): rounds as in :mod:`coordinator.federation`.

Run config (``[tool.flwr.app.config]``, overridable with ``flwr run . --run-config``) names the coordinator's
service (``coordinator``, ``root-cert`` or ``insecure``, the pinned ``coordinator-key``), the admin key it signs
its calls with, the job and the owners' training settings; ``offsite-coordinator simulate`` passes the same keys
in-process. This process holds no coordinator key and never opens the coordinator's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import FederationSettings, run_rounds


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    app = ServerApp()
    fixed = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = FederationSettings.from_config({**dict(context.run_config), **fixed})
        run_rounds(grid, settings)

    return app


app = make_server_app()
