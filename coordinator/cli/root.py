"""The ``offsite-coordinator`` app: every command group registered."""

from __future__ import annotations

import typer

from coordinator.cli.admin_key import admin_key_app
from coordinator.cli.app_sign import app_app
from coordinator.cli.delta_key import delta_key_app
from coordinator.cli.deploy import deploy_app
from coordinator.cli.emulator import emulator_app
from coordinator.cli.export import export_command, verify_export_command
from coordinator.cli.jobs import job_app
from coordinator.cli.keys import keys_app
from coordinator.cli.market import market_app
from coordinator.cli.owners import owners_app
from coordinator.cli.rounds import round_app
from coordinator.cli.run import demo_command, eval_command, simulate_command
from coordinator.cli.serve import serve
from coordinator.cli.serve_models import adapters_app, serve_models_command
from coordinator.cli.sweep import sweep_command

app = typer.Typer(help="Offsite tuning, model owner's side: build bundles, run rounds, plug in, evaluate.",
                  no_args_is_help=True)
app.add_typer(keys_app, name="keys")
emulator_app.command("sweep")(sweep_command)
app.add_typer(emulator_app, name="emulator")
app.command("simulate")(simulate_command)
app.command("demo")(demo_command)
app.command("eval")(eval_command)
app.command("serve")(serve)
app.add_typer(owners_app, name="owners")
app.add_typer(job_app, name="job")
app.add_typer(round_app, name="round")
app.add_typer(delta_key_app, name="delta-key")
app.add_typer(admin_key_app, name="admin-key")
app.add_typer(deploy_app, name="deploy")
app.add_typer(app_app, name="app")
app.command("export")(export_command)
app.command("verify-export")(verify_export_command)
app.add_typer(market_app, name="market")
app.command("serve-models")(serve_models_command)
app.add_typer(adapters_app, name="adapters")
