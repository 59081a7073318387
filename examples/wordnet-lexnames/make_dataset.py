"""Regenerate the demo dataset: WordNet 3.0 noun glosses labelled with their lexicographer file.

Source: Debian's ``wordnet-base`` package (``apt-get install wordnet-base``, or ``apt-get download wordnet-base``
and ``dpkg -x`` it), file ``/usr/share/wordnet/data.noun``. Licence: the WordNet 3.0 licence (see LICENSE).
The dataset ships as package data: by default this writes ``train.jsonl`` and ``eval.jsonl`` into
``coordinator/demo_data/wordnet-lexnames/`` of this repository (keep ``LICENSE`` beside them).

    python examples/wordnet-lexnames/make_dataset.py [--data-noun /usr/share/wordnet/data.noun] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

# Lexicographer file numbers of data.noun (see lexnames(5WN)) and the demo's labels.
LEXNAMES = {"05": "animal", "06": "artifact", "13": "food", "17": "object", "18": "person", "20": "plant"}
PER_LABEL = 260
EVAL_FRACTION = 0.2
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "coordinator" / "demo_data" / "wordnet-lexnames"


def glosses(data_noun: Path) -> dict[str, list[tuple[str, str]]]:
    """(first lemma, definition) per label; the definition is the gloss up to its first quoted example."""
    found: dict[str, list[tuple[str, str]]] = {label: [] for label in LEXNAMES.values()}
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        label = LEXNAMES.get(parts[1])
        if label is None:
            continue
        definition = re.split(r';\s*"', gloss.strip())[0].strip().rstrip(";").strip()
        if 3 <= len(definition.split()) <= 30:
            found[label].append((parts[4].replace("_", " "), definition))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-noun", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train, evaluation = [], []
    for label, items in sorted(glosses(args.data_noun).items()):
        # A stable, content-based choice: the PER_LABEL definitions with the smallest hashes.
        items = sorted(items, key=lambda item: hashlib.sha256(item[1].encode()).hexdigest())[:PER_LABEL]
        cut = int(len(items) * (1 - EVAL_FRACTION))
        train += [{"text": definition, "label": label} for _, definition in items[:cut]]
        evaluation += [{"text": definition, "label": label} for _, definition in items[cut:]]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        rows.sort(key=lambda row: hashlib.sha256(row["text"].encode()).hexdigest())
        with open(args.out / name, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
