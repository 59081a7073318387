"""docker-compose.yml cannot run here (no Docker engine), so check it against the code: every command exists
with every flag it passes, every port it publishes is the one its command listens on, every service it points
at exists and listens where it is pointed, and every node-config key is one the ClientApp reads."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from client.flower_app import NODE_CONFIG_KEYS
from coordinator.cli import app as coordinator_app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BIN = Path(sys.executable).parent


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def offsite_options(command: list[str]) -> set[str]:
    """The options of an offsite-coordinator subcommand, read from the Typer app itself."""
    group: click.Command = typer.main.get_command(coordinator_app)
    for word in command[1:]:
        if isinstance(group, click.Group) and word in group.commands:
            group = group.commands[word]
        else:
            break
    assert not isinstance(group, click.Group), f"{command[:3]} is not a command"
    return {opt for param in group.params for opt in getattr(param, "opts", [])}


def flower_options(program: str) -> str:
    result = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_flag_exists(name: str) -> None:
    command = SERVICES[name]["command"]
    flags = [word for word in command if word.startswith("--")]
    if command[0] == "offsite-coordinator":
        known = offsite_options(command)
        assert set(flags) <= known, f"{name}: unknown flags {set(flags) - known}"
    else:
        assert command[0] in ("flower-superlink", "flower-supernode"), command[0]
        help_text = flower_options(command[0])
        for word in flags:
            assert word in help_text, f"{name}: {command[0]} has no {word}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_are_the_ports_commands_listen_on(name: str) -> None:
    service = SERVICES[name]
    command = service["command"]
    for mapping in service.get("ports", []):
        container_port = str(mapping).split(":")[-1]
        assert flag(command, "--port") == container_port, f"{name} publishes {mapping}"
    if "--port" in command:
        assert flag(command, "--host") == "0.0.0.0", f"{name} must listen beyond the container's loopback"


def test_references_point_at_listening_services() -> None:
    listening = {name: flag(service["command"], "--port") for name, service in SERVICES.items()
                 if "--port" in service["command"]}
    supernodes = [s for s in SERVICES.values() if s["command"][0] == "flower-supernode"]
    assert len(supernodes) >= 2
    for service in supernodes:
        host, port = flag(service["command"], "--superlink").split(":")
        assert listening[host] == port and SERVICES[host]["command"][0] == "flower-superlink"
        settings = dict(item.split("=", 1) for item in shlex.split(flag(service["command"], "--node-config")))
        assert set(settings) <= NODE_CONFIG_KEYS, set(settings) - NODE_CONFIG_KEYS
        host, port = settings["coordinator"].split(":")
        assert listening[host] == port and SERVICES[host]["command"][:2] == ["offsite-coordinator", "serve"]
    partitions = sorted(int(dict(i.split("=", 1) for i in shlex.split(flag(s["command"], "--node-config")))
                            ["partition-id"]) for s in supernodes)
    assert partitions == list(range(len(supernodes)))
    node_ports = [flag(s["command"], "--port") for s in supernodes]
    assert len(set(node_ports)) == len(node_ports), "supernodes on one host need their own --port"


def test_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            assert source.startswith(("./", "/")) or source in declared, f"{name}: undeclared volume {source}"
