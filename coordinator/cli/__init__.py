"""``offsite-coordinator``: the model owner's admin CLI, one module per command group.

The full app (:mod:`coordinator.cli.root`) imports every command's stack, the federation's included. ``serve-models``
runs in a long-lived server process, so :func:`main` gives it an app of its own that imports the serving stack only.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

LIGHT_COMMANDS = ("serve-models",)


def __getattr__(name: str) -> Any:
    if name == "app":
        from coordinator.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _serving_app() -> typer.Typer:
    from coordinator.cli.serve_models import serve_models_command

    app = typer.Typer(help="Offsite tuning, model owner's side: serve tuned adapters.")
    app.callback()(lambda: None)  # a group, so that ``serve-models`` stays a subcommand
    app.command("serve-models")(serve_models_command)
    return app


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in LIGHT_COMMANDS:
        _serving_app()()
        return
    from coordinator.cli.root import app

    app()
