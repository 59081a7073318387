"""``offsite-client market``: what a data owner earns from the adapters it helped train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from client.cli.common import OWNER_KEY, console, default_client_dir, fail_with
from client.market import EarningsError, fetch_earnings
from protos import crypto
from protos.errors import ExitCode

market_app = typer.Typer(help="The marketplace: a data owner's earnings.", no_args_is_help=True)


@market_app.command("earnings")
def earnings(
    server: Annotated[str, typer.Option(help="The coordinator's HTTP server, e.g. https://coordinator:8443.")],
    month: Annotated[str, typer.Option(help="The month, YYYY-MM.")],
    key: Annotated[Path | None, typer.Option(help="The owner's signing key (default: "
                                                  "$OFFSITE_HOME/client/owner.key).")] = None,
    owner_id: Annotated[str | None, typer.Option(help="Owner id (default: the key id).")] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate for the server's TLS certificate.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Show this owner's payout lines for a month, authenticated with the owner's key."""
    try:
        owner_key = crypto.load_private_key(key or default_client_dir() / OWNER_KEY)
        answer = fetch_earnings(server, owner_key, owner_id or crypto.key_id(owner_key.public_key()), month,
                                verify=str(ca) if ca else True)
    except crypto.KeyFileError as error:
        fail_with(error)
    except EarningsError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(int(ExitCode.BAD_INPUT if error.status == 400 else ExitCode.FAILED)) from error
    if as_json:
        typer.echo(json.dumps(answer.to_json(), indent=2))
        return
    table = Table(title=f"earnings of {answer.owner_id}, {answer.month}")
    for column in ("listing", "num_examples", "amount"):
        table.add_column(column, justify="left" if column == "listing" else "right")
    for line in answer.lines:
        table.add_row(line.listing, str(line.num_examples), line.amount)
    table.add_row("total", "", answer.total)
    console.print(table)
