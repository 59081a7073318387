"""docker-compose.yml cannot run here (no Docker engine), so check it against the code: every command exists
with every flag it passes, every port it publishes is the one its command listens on, every service it points
at exists and listens where it is pointed, and every node-config key is one the ClientApp reads.

And against the deployment's security: TLS and SuperNode authentication on, no ``--insecure``, the SuperLink
published on the host's loopback only, every mounted path one that ``offsite-coordinator deploy init`` writes,
every file a command names present there, and no service able to read a key that is not its own."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from client.cli import app as client_app
from client.cli.node import NodeFiles, supernode_command
from client.flower_app import NODE_CONFIG_KEYS
from coordinator.cli import app as coordinator_app
from coordinator.federation import FederationSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BIN = Path(sys.executable).parent
NODE_START = ["offsite-client", "node", "start"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def effective(command: list[str]) -> list[str]:
    """What the container runs in the end: ``offsite-client node start`` execs ``flower-supernode`` with the command
    line ``supernode_command`` builds from its options (paths as the container sees them)."""
    if command[:3] != NODE_START:
        return command
    directory = Path(flag(command, "--dir"))
    return supernode_command(NodeFiles(directory), superlink=flag(command, "--superlink"),
                             coordinator=flag(command, "--coordinator"), job=flag(command, "--job"),
                             train=Path(flag(command, "--train")), cache=directory / "cache",
                             port=int(flag(command, "--port")))


def offsite_options(command: list[str]) -> set[str]:
    """The options of an offsite-coordinator (or offsite-client) subcommand, read from the Typer app itself."""
    group: click.Command = typer.main.get_command(client_app if command[0] == "offsite-client" else coordinator_app)
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
    if command[0] in ("offsite-coordinator", "offsite-client"):
        known = offsite_options(command)
        assert set(flags) <= known, f"{name}: unknown flags {set(flags) - known}"
    if command[:3] == NODE_START:
        command = effective(command)
        flags = [word for word in command if word.startswith("--")]
    if command[0] != "offsite-coordinator":
        assert command[0] in ("flower-superlink", "flower-supernode"), command[0]
        help_text = flower_options(command[0])
        for word in flags:
            assert word in help_text, f"{name}: {command[0]} has no {word}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_published_ports_are_the_ports_commands_listen_on(name: str) -> None:
    service = SERVICES[name]
    command = effective(service["command"])
    for mapping in service.get("ports", []):
        container_port = str(mapping).split(":")[-1]
        assert flag(command, "--port") == container_port, f"{name} publishes {mapping}"
    if "--port" in command:
        if command[0] == "flower-supernode":  # its Runtime API has no authentication: not for other containers
            assert flag(command, "--host") == "127.0.0.1", f"{name}'s Runtime API must stay on its loopback"
            assert not service.get("ports"), f"{name} must publish nothing"
        else:
            assert flag(command, "--host") == "0.0.0.0", f"{name} must listen beyond the container's loopback"


def test_references_point_at_listening_services() -> None:
    listening = {name: flag(service["command"], "--port") for name, service in SERVICES.items()
                 if "--port" in service["command"] and name not in supernode_names()}
    supernodes = [effective(SERVICES[name]["command"]) for name in supernode_names()]
    assert len(supernodes) >= 2
    for command in supernodes:
        host, port = flag(command, "--superlink").split(":")
        assert listening[host] == port and SERVICES[host]["command"][0] == "flower-superlink"
        settings = dict(item.split("=", 1) for item in shlex.split(flag(command, "--node-config")))
        assert set(settings) <= NODE_CONFIG_KEYS, set(settings) - NODE_CONFIG_KEYS
        host, port = settings["coordinator"].split(":")
        assert listening[host] == port and SERVICES[host]["command"][:2] == ["offsite-coordinator", "serve"]
    node_ports = [flag(command, "--port") for command in supernodes]
    assert len(set(node_ports)) == len(node_ports), "supernodes on one host need their own --port"


def test_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            assert source.startswith(("./", "/")) or source in declared, f"{name}: undeclared volume {source}"


def node_config(service: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(flag(effective(service["command"]), "--node-config")))


def supernode_names() -> list[str]:
    return sorted(name for name, s in SERVICES.items() if effective(s["command"])[0] == "flower-supernode")


def test_tls_and_node_authentication_everywhere() -> None:
    for name, service in SERVICES.items():
        command = service["command"]
        assert not any("insecure" in word for word in command), f"{name} runs without TLS"
    superlink = SERVICES["superlink"]["command"]
    for option in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert option in superlink, f"superlink lacks {option}"
    assert SERVICES["superlink"]["ports"] == ["127.0.0.1:8000:8000"], "the Control API has no login: loopback only"
    coordinator = SERVICES["coordinator"]["command"]
    assert "--tls-cert" in coordinator and "--tls-key" in coordinator
    for name in supernode_names():
        command = effective(SERVICES[name]["command"])
        assert "--root-certificates" in command and "--auth-supernode-private-key" in command, name
        assert node_config(SERVICES[name]).get("root-cert"), f"{name} must reach the coordinator over TLS"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `deploy init` writes, where docker-compose.yml expects it (./deploy beside the compose file)."""
    root = tmp_path_factory.mktemp("compose")
    result = CliRunner().invoke(coordinator_app, ["deploy", "init", "--out", str(root / "deploy"),
                                                  "--owners", str(len(supernode_names()))])
    assert result.exit_code == 0, result.output
    return root


def mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath]]:
    """(host path relative to the compose file, container path) of each bind mount."""
    pairs = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        assert source.startswith("./deploy/"), f"{volume}: only parts of what deploy init writes are mounted"
        pairs.append((source, PurePosixPath(target)))
    return pairs


def host_path(root: Path, service: dict[str, Any], container_path: str) -> Path:
    """The file behind ``container_path`` in ``service``, through its mounts (the deepest mount wins)."""
    path = PurePosixPath(container_path)
    best = max(((source, target) for source, target in mounts(service) if path == target or target in path.parents),
               key=lambda pair: len(pair[1].parts), default=None)
    assert best is not None, f"{container_path} is not mounted"
    source, target = best
    return root / source / path.relative_to(target)


def visible_files(root: Path, service: dict[str, Any]) -> set[str]:
    """Every file of the deploy-init tree this service can read, relative to the compose file's directory."""
    seen = set()
    for source, _ in mounts(service):
        path = root / source
        assert path.exists(), f"{source} is mounted but deploy init does not write it"
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            seen.add(file.relative_to(root).as_posix())
    return seen


FILE_FLAGS = ("--state", "--tls-cert", "--tls-key", "--key", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
              "--root-certificates", "--auth-supernode-private-key")


def test_every_mount_and_named_file_is_written_by_deploy_init(deployed: Path) -> None:
    run_config = tomllib.loads((deployed / "deploy" / "run.toml").read_text())
    for name, service in SERVICES.items():
        visible_files(deployed, service)
        command = effective(service["command"])
        for option in FILE_FLAGS:
            if option in command:
                assert host_path(deployed, service, flag(command, option)).exists(), f"{name} {option}"
        if command[0] == "flower-supernode":
            settings = node_config(service)
            for key in ("root-cert", "coordinator-key", "owner-key"):
                assert host_path(deployed, service, settings[key]).is_file(), f"{name} {key}"
            assert host_path(deployed, service, settings["cache-dir"]).parent.is_dir()
            assert settings["job-id"] == run_config["job-id"], f"{name} trains for another job than run.toml's"
            owner_dir = host_path(deployed, service, flag(service["command"], "--dir"))
            assert not NodeFiles(owner_dir).missing(), f"{name}: {NodeFiles(owner_dir).missing()}"
    federation = FederationSettings.from_config(run_config)  # the ServerApp runs in the superlink container
    superlink = SERVICES["superlink"]
    for path in (federation.admin_key, federation.coordinator_key, federation.root_cert):
        assert path is not None and host_path(deployed, superlink, str(path)).is_file(), path
    assert not federation.insecure
    host, port = federation.coordinator.split(":")  # the ServerApp reaches the coordinator's service
    assert flag(SERVICES[host]["command"], "--port") == port and SERVICES[host]["command"][:2] == [
        "offsite-coordinator", "serve"]
    coordinator = SERVICES["coordinator"]
    checkpoints = host_path(deployed, coordinator, flag(coordinator["command"], "--checkpoints"))
    assert (checkpoints / federation.job_id).is_dir()
    assert federation.min_replies == len(supernode_names())


def test_no_service_reads_a_key_that_is_not_its_own(deployed: Path) -> None:
    everything = {p.relative_to(deployed).as_posix() for p in deployed.rglob("*") if p.is_file()}
    assert "deploy/ca/ca.key" in everything
    for name, service in SERVICES.items():
        files = visible_files(deployed, service)
        assert not any(f.startswith("deploy/ca/") for f in files), f"{name} can read the CA key"
        if name in supernode_names():
            own = f"deploy/owner-{name.rsplit('-', 1)[1]}/"
            assert ("./" + own.rstrip("/"), PurePosixPath("/owner")) in mounts(service), name
            others = sorted(f for f in files if not f.startswith(own))
            assert not others, f"{name} reads {others}"
        else:
            assert not any(f.startswith("deploy/owner-") for f in files), f"{name} reads an owner's directory"
    superlink = visible_files(deployed, SERVICES["superlink"])
    assert not any(f.startswith("deploy/coordinator/") for f in superlink), "the ServerApp sees no coordinator file"
    assert "deploy/serverapp/admin.key" in superlink
    assert not any(f.startswith("deploy/serverapp/") for f in visible_files(deployed, SERVICES["coordinator"]))
    coordinator = visible_files(deployed, SERVICES["coordinator"])
    assert not any(f.startswith("deploy/superlink/") for f in coordinator)
