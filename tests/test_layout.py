"""The layout rules: client and coordinator never import each other; emulator does no networking."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        if "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("client", {"coordinator"}),
    ("coordinator", {"client"}),
    ("emulator", {"client", "coordinator", "grpc", "flwr", "socket", "requests", "urllib"}),
    ("protos", {"client", "coordinator", "flwr"}),
])
def test_package_boundaries(package: str, forbidden: set[str]) -> None:
    imports = imported_packages(package)
    offenders = {name: sorted(imports[name]) for name in forbidden if name in imports}
    assert not offenders, f"{package}/ imports {offenders}"


def test_no_unpickling_outside_tests() -> None:
    for package in ("client", "coordinator", "emulator", "protos"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("pickle.load", "torch.load(", "dill."):
                assert needle not in text, f"{path}: {needle}"
