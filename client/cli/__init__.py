"""``offsite-client``: the data owner's CLI, one module per command group."""

from __future__ import annotations

import typer

from client.cli.bundle import bundle_app
from client.cli.keys import keys_app
from client.cli.market import market_app
from client.cli.node import node_app
from client.cli.wire import join, status, submit

app = typer.Typer(help="Offsite tuning, data owner's side: verify bundles, train, seal and submit deltas.",
                  no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(keys_app, name="keys")
app.add_typer(node_app, name="node")
app.add_typer(market_app, name="market")
app.command("join")(join)
app.command("submit")(submit)
app.command("status")(status)


def main() -> None:
    app()
