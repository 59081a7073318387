"""The layout rules, enforced on the source tree.

* ``protos`` imports none of our other packages, and not ``flwr``.
* ``emulator`` imports only ``protos`` among ours, and does no networking.
* ``client`` and ``coordinator`` never import each other.  The one named exception: the coordinator's simulation
  loads the data owners' ClientApp *by reference*, as the string ``"client.flower_app:make_client_app"`` handed to
  importlib (as Flower loads ``[tool.flwr.app.components]``).  That exact string is allowed, nothing else.

What counts as an import (anywhere in a file: at module level, inside functions, under ``if TYPE_CHECKING:``):

* ``import x.y`` and ``from x.y import z``;
* relative imports, resolved against the file's package (``from ..client import x`` in ``coordinator/`` is
  ``client``);
* ``importlib.import_module(...)``, ``__import__(...)`` and ``pkgutil.resolve_name(...)`` with a constant string
  argument, or with a module-level constant holding one;
* any string constant shaped like an entry-point reference, ``"pkg.module:attr"``.

Generated files (``*_pb2*.py``) are skipped.  ``violations`` is a pure function of a directory tree, so the tests below
run it both on the real repository and on small fake trees with deliberate bad imports.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OURS = frozenset({"protos", "emulator", "client", "coordinator"})
NETWORKING = frozenset({"grpc", "flwr", "socket", "requests", "urllib", "urllib3", "http", "httpx", "aiohttp"})
GENERATED = "*_pb2*.py"
CLIENT_APP_REFERENCE = "client.flower_app:make_client_app"

# Calls that import the module named by their first argument.
IMPORTER_CALLS = frozenset({"import_module", "__import__", "resolve_name"})
# "pkg.module:attr" (an entry-point style reference); the attr part may be dotted.
_IDENT = r"[A-Za-z_]\w*"
REFERENCE = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*$")


@dataclass(frozen=True)
class Rule:
    """What the files under ``package/`` may not import.

    ``may_import`` lists which of *our other* packages it may import (every other one of ours is forbidden);
    ``forbidden_external`` lists third-party / stdlib top-level modules it must not import;
    ``allowed_references`` lists exact ``"pkg.module:attr"`` strings that are allowed although they name a forbidden
    package (the reference form only: an ``import`` statement or ``import_module`` of the same module still counts).
    """

    package: str
    may_import: frozenset[str] = frozenset()
    forbidden_external: frozenset[str] = frozenset()
    allowed_references: frozenset[str] = frozenset()

    @property
    def forbidden(self) -> frozenset[str]:
        return (OURS - {self.package} - self.may_import) | self.forbidden_external


RULES: tuple[Rule, ...] = (
    Rule("protos", forbidden_external=frozenset({"flwr"})),
    Rule("emulator", may_import=frozenset({"protos"}), forbidden_external=NETWORKING),
    Rule("client", may_import=frozenset({"protos", "emulator"})),
    Rule("coordinator", may_import=frozenset({"protos", "emulator"}),
         allowed_references=frozenset({CLIENT_APP_REFERENCE})),
)


@dataclass(frozen=True)
class Import:
    """One thing a file imports: the full module name, where, and how (for the message)."""

    module: str
    line: int
    how: str
    reference: str | None = None  # the exact string, for a "pkg.module:attr" reference

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _package_of(root: Path, path: Path) -> list[str]:
    """The dotted package a file's relative imports resolve against, as parts."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a module's package is its directory; an __init__'s package is its directory too


def _resolve_relative(package: list[str], level: int, module: str | None) -> list[str]:
    """``from .{level}module import ...`` inside ``package``.  Going above the top package stops there (so
    ``from ..client import x`` in ``coordinator/`` is ``client``) rather than being an error."""
    base = package[: max(len(package) - (level - 1), 0)]
    return [".".join([*base, module])] if module else ([".".join(base)] if base else [])


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "..."`` (or annotated) assignments, so ``import_module(NAME)`` resolves."""
    constants: dict[str, str] = {}
    for node in tree.body:
        value: ast.expr | None = None
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            value, targets = node.value, node.targets
        elif isinstance(node, ast.AnnAssign):
            value, targets = node.value, [node.target]
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            for target in targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = value.value
    return constants


def imports_of(root: Path, path: Path) -> Iterator[Import]:
    """Everything ``path`` imports, in any of the forms listed in the module docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = _package_of(root, path)
    constants = _string_constants(tree)
    consumed: set[int] = set()  # constants already reported as an importer call's argument
    for node in ast.walk(tree):  # breadth-first: a call is seen before its arguments
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            what = ", ".join(alias.name for alias in node.names)
            how = f"from {'.' * node.level}{node.module or ''} import {what}"
            if node.level == 0:
                yield Import(node.module or "", node.lineno, how)
                continue
            modules = _resolve_relative(package, node.level, node.module)
            if not modules:  # ``from .. import client`` at the top: the names are the modules
                modules = [alias.name for alias in node.names]
            for module in modules:
                yield Import(module, node.lineno, how)
        elif isinstance(node, ast.Call) and _call_name(node.func) in IMPORTER_CALLS and node.args:
            arg = node.args[0]
            name: str | None = None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
                consumed.add(id(arg))
            elif isinstance(arg, ast.Name):
                name = constants.get(arg.id)
            if name is None:
                continue
            module = name.partition(":")[0]
            if module.startswith("."):  # import_module(".x", package="pkg")
                anchor = next((kw.value for kw in node.keywords if kw.arg == "package"), None)
                level = len(module) - len(module.lstrip("."))
                if not (isinstance(anchor, ast.Constant) and isinstance(anchor.value, str)):
                    continue
                resolved = _resolve_relative(anchor.value.split("."), level, module.lstrip(".") or None)
                if not resolved:
                    continue
                module = resolved[0]
            yield Import(module, node.lineno, f"{_call_name(node.func)}({name!r})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and REFERENCE.match(node.value)
              and id(node) not in consumed):
            yield Import(node.value.partition(":")[0], node.lineno, f"reference {node.value!r}", node.value)


def violations(root: Path, rules: Iterable[Rule]) -> list[str]:
    """Every forbidden import under ``root``, as ``"path:line: package/ must not import X (how)"``, sorted."""
    found: list[str] = []
    for rule in rules:
        for path in sorted((root / rule.package).rglob("*.py")):
            if fnmatch.fnmatch(path.name, GENERATED):
                continue
            rel = path.relative_to(root).as_posix()
            try:
                imports = list(imports_of(root, path))
            except SyntaxError as exc:
                found.append(f"{rel}:{exc.lineno or 0}: cannot parse ({exc.msg})")
                continue
            for imp in imports:
                if imp.top not in rule.forbidden:
                    continue
                if imp.reference is not None and imp.reference in rule.allowed_references:
                    continue
                found.append(f"{rel}:{imp.line}: {rule.package}/ must not import {imp.top} ({imp.how})")
    return sorted(set(found))


def _rule(package: str) -> Rule:
    return next(rule for rule in RULES if rule.package == package)


# -- the real repository --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", [rule.package for rule in RULES])
def test_package_boundaries(package: str) -> None:
    assert (ROOT / package).is_dir()
    found = violations(ROOT, [_rule(package)])
    assert not found, "\n".join(found)


def test_client_app_reference_is_live() -> None:
    """The one exception must name something real, and still be in use (else drop it from the rules)."""
    module, _, attr = CLIENT_APP_REFERENCE.partition(":")
    target = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(target.read_text(encoding="utf-8"))
    assert any(isinstance(node, ast.FunctionDef) and node.name == attr for node in tree.body), \
        f"{target.relative_to(ROOT)} defines no {attr}()"
    users = [
        path for path in (ROOT / "coordinator").rglob("*.py")
        if any(imp.reference == CLIENT_APP_REFERENCE for imp in imports_of(ROOT, path))
    ]
    assert users, f"nothing under coordinator/ uses {CLIENT_APP_REFERENCE!r} any more"


def test_no_unpickling_outside_tests() -> None:
    found = []
    for package in ("client", "coordinator", "emulator", "protos"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for needle in ("pickle.load", "torch.load(", "dill."):
                if needle in text:
                    found.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not found, "\n".join(found)


# -- the checker itself, on fake trees with deliberate bad imports ------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for package in OURS:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root


CLEAN = {
    "protos/messages.py": """\
        import json
        from . import serde
        from .serde import dumps
        """,
    "protos/serde.py": "import struct\n",
    "emulator/surgery.py": """\
        import importlib
        from typing import TYPE_CHECKING

        import torch
        from protos.tensors import pack
        from ..protos import bundle
        if TYPE_CHECKING:
            from protos.messages import Message
        PLUGIN = importlib.import_module("emulator.methods")
        """,
    "client/owner.py": """\
        from emulator.train import train
        from protos import crypto
        from . import transport
        from .transport import send
        import grpc, flwr
        """,
    "coordinator/simulate/__init__.py": """\
        import importlib
        CLIENT_APP_FACTORY = "client.flower_app:make_client_app"
        def load(settings):
            module_name, _, factory = CLIENT_APP_FACTORY.partition(":")
            return getattr(importlib.import_module(module_name), factory)(settings)
        """,
    "coordinator/server.py": """\
        from .simulate import load
        from emulator.data import load_examples
        import grpc
        GREETING = "client: hello"
        LOGGER = "coordinator.server"
        """,
    "protos/offsite/v1/bundle_pb2.py": "import client.owner  # generated files are skipped\n",
}


def test_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path, CLEAN), RULES) == []


@pytest.mark.parametrize(("name", "source", "expected"), [
    ("protos/bad.py", "from emulator.surgery import x\n",
     "protos/bad.py:1: protos/ must not import emulator (from emulator.surgery import x)"),
    ("protos/bad.py", "import flwr.common\n",
     "protos/bad.py:1: protos/ must not import flwr (import flwr.common)"),
    ("protos/sub/bad.py", "from ...client import owner\n",
     "protos/sub/bad.py:1: protos/ must not import client (from ...client import owner)"),
    ("emulator/bad.py", "from coordinator import x\n",
     "emulator/bad.py:1: emulator/ must not import coordinator (from coordinator import x)"),
    ("emulator/bad.py", "import os\nimport urllib.request\n",
     "emulator/bad.py:2: emulator/ must not import urllib (import urllib.request)"),
    ("emulator/bad.py", "from http import client\n",
     "emulator/bad.py:1: emulator/ must not import http (from http import client)"),
    ("emulator/bad.py", "def fetch():\n    import socket\n",
     "emulator/bad.py:2: emulator/ must not import socket (import socket)"),
    ("emulator/bad.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n",
     "emulator/bad.py:3: emulator/ must not import grpc (import grpc)"),
    ("emulator/bad.py", "requests = __import__('requests')\n",
     "emulator/bad.py:1: emulator/ must not import requests (__import__('requests'))"),
    ("client/bad.py", "from ..coordinator import y\n",
     "client/bad.py:1: client/ must not import coordinator (from ..coordinator import y)"),
    ("client/bad.py", "from .. import coordinator\n",
     "client/bad.py:1: client/ must not import coordinator (from .. import coordinator)"),
    ("client/bad.py", "import importlib\nserver = importlib.import_module(\"coordinator.server\")\n",
     "client/bad.py:2: client/ must not import coordinator (import_module('coordinator.server'))"),
    ("client/bad.py", "from importlib import import_module\nNAME = 'coordinator.state'\nimport_module(NAME)\n",
     "client/bad.py:3: client/ must not import coordinator (import_module('coordinator.state'))"),
    ("client/bad.py", "import importlib\nimportlib.import_module('.server', package='coordinator')\n",
     "client/bad.py:2: client/ must not import coordinator (import_module('.server'))"),
    ("client/bad.py", "SERVER_APP = 'coordinator.flower_app:app'\n",
     "client/bad.py:1: client/ must not import coordinator (reference 'coordinator.flower_app:app')"),
    ("coordinator/bad.py", "def f():\n    import client.owner\n",
     "coordinator/bad.py:2: coordinator/ must not import client (import client.owner)"),
    ("coordinator/bad.py", "TRAIN = \"client.owner:train_round\"\n",
     "coordinator/bad.py:1: coordinator/ must not import client (reference 'client.owner:train_round')"),
    ("coordinator/bad.py", "import pkgutil\npkgutil.resolve_name('client.owner:train_round')\n",
     "coordinator/bad.py:2: coordinator/ must not import client (resolve_name('client.owner:train_round'))"),
    # The exception is the reference string only: importing the same module by name is still a violation.
    ("coordinator/bad.py", "import importlib\nimportlib.import_module('client.flower_app')\n",
     "coordinator/bad.py:2: coordinator/ must not import client (import_module('client.flower_app'))"),
    ("coordinator/bad.py", "from client.flower_app import make_client_app\n",
     "coordinator/bad.py:1: coordinator/ must not import client (from client.flower_app import make_client_app)"),
    ("coordinator/simulate/bad.py", "from ...client import flower_app\n",
     "coordinator/simulate/bad.py:1: coordinator/ must not import client (from ...client import flower_app)"),
])
def test_checker_reports_a_bad_import(tmp_path: Path, name: str, source: str, expected: str) -> None:
    root = _tree(tmp_path, {**CLEAN, name: source})
    assert violations(root, RULES) == [expected]


def test_checker_allows_only_the_named_client_app_reference(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        **CLEAN,
        "coordinator/simulate/run.py": f"FACTORY = {CLIENT_APP_REFERENCE!r}\n",
        "emulator/bad.py": f"FACTORY = {CLIENT_APP_REFERENCE!r}\n",  # the exception is coordinator's alone
        "coordinator/other.py": "OTHER = 'client.owner:train_round'\n",
    })
    assert violations(root, RULES) == [
        "coordinator/other.py:1: coordinator/ must not import client (reference 'client.owner:train_round')",
        f"emulator/bad.py:1: emulator/ must not import client (reference {CLIENT_APP_REFERENCE!r})",
    ]


def test_checker_reports_every_offender_with_file_and_line(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        **CLEAN,
        "protos/bad.py": "from emulator.surgery import x\n",
        "emulator/bad.py": "from coordinator import x\n",
        "client/bad.py": "from ..coordinator import y\n",
        "client/worse.py": "import importlib\nimportlib.import_module(\"coordinator.server\")\n",
        "coordinator/bad.py": "def f():\n    import client.owner\n",
    })
    assert violations(root, RULES) == [
        "client/bad.py:1: client/ must not import coordinator (from ..coordinator import y)",
        "client/worse.py:2: client/ must not import coordinator (import_module('coordinator.server'))",
        "coordinator/bad.py:2: coordinator/ must not import client (import client.owner)",
        "emulator/bad.py:1: emulator/ must not import coordinator (from coordinator import x)",
        "protos/bad.py:1: protos/ must not import emulator (from emulator.surgery import x)",
    ]
    # Checking one package at a time (as the real-repo tests do) sees only that package's files.
    assert violations(root, [_rule("protos")]) == [
        "protos/bad.py:1: protos/ must not import emulator (from emulator.surgery import x)",
    ]


def test_checker_reports_an_unparsable_file(tmp_path: Path) -> None:
    root = _tree(tmp_path, {**CLEAN, "client/broken.py": "def (:\n"})
    [only] = violations(root, RULES)
    assert only.startswith("client/broken.py:1: cannot parse")
