"""Regenerate ``python-docstrings.txt``: docstrings of the Python standard library, one document per line.

The text is Python's own documentation (PSF License Agreement, see LICENSE-PSF.txt beside this file), read from
the interpreter's ``Lib/`` sources with :mod:`ast` (nothing is imported or executed). The corpus ships as package
data of ``emulator``: by default this writes ``emulator/corpora/python-docstrings.txt`` of this repository (keep
``LICENSE-PSF.txt`` beside it). Run it with any CPython 3.11+:

    python examples/corpus/make_corpus.py [--max-bytes 300000] [--out PATH]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sysconfig
from pathlib import Path

MODULES = (
    "argparse", "ast", "asyncio/base_events", "asyncio/events", "asyncio/locks", "asyncio/queues", "asyncio/streams",
    "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "_pydecimal", "difflib", "email/message", "enum", "fractions",
    "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http/client", "http/cookiejar",
    "imaplib", "inspect", "ipaddress", "json/__init__", "json/decoder", "json/encoder", "locale", "logging/__init__",
    "logging/handlers", "mailbox", "netrc", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pprint",
    "queue", "random", "shlex", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "turtle", "typing", "unittest/case",
    "urllib/parse", "urllib/request", "uuid", "warnings", "weakref", "zipfile", "zoneinfo/_zoneinfo",
)
MIN_CHARS = 160
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "emulator" / "corpora" / "python-docstrings.txt"


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            text = re.sub(r"\s+", " ", inspect.cleandoc(doc)).strip()
            if len(text) >= MIN_CHARS and text.isascii():
                docs.append(text)
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-bytes", type=int, default=300_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    lib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    lines: list[str] = []
    size = 0
    for module in MODULES:
        path = lib / f"{module}.py"
        if not path.is_file():
            continue
        for doc in docstrings(path):
            if doc in seen or size + len(doc) + 1 > args.max_bytes:
                continue
            seen.add(doc)
            lines.append(doc)
            size += len(doc) + 1
    args.out.write_text("\n".join(lines) + "\n", encoding="ascii")
    print(f"{args.out}: {len(lines)} documents, {size:,} bytes")


if __name__ == "__main__":
    main()
