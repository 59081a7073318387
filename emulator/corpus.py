"""Public text for distillation: ``.txt`` (one document per line) or ``.jsonl`` (a ``text`` field), a held-out
slice chosen by document hash, and padded token batches in a deterministic, resumable order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from emulator.errors import EmulatorError

DEFAULT_CORPUS_NAME = "python-docstrings.txt"  # package data: emulator/corpora/, licence LICENSE-PSF.txt beside it


class CorpusError(EmulatorError):
    """A corpus file is missing, unreadable or empty."""

    bad_input = True


def default_corpus() -> Path:
    """The corpus that ships with the project: Python standard-library docstrings (PSF licence), installed as
    package data of :mod:`emulator` (never read through the repository tree)."""
    path = Path(str(files("emulator") / "corpora" / DEFAULT_CORPUS_NAME))
    if not path.is_file():
        raise CorpusError(f"the default corpus {path} is missing (a broken install?); name a corpus file instead")
    return path


def read_documents(paths: Sequence[Path]) -> list[str]:
    """Every non-empty document of every file, in file order."""
    docs: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise CorpusError(f"corpus {path}: no such file")
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if Path(path).suffix == ".jsonl":
            try:
                docs += [str(json.loads(line)["text"]).strip() for line in lines if line.strip()]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CorpusError(f"corpus {path}: every line must be a JSON object with a 'text' field") from error
        else:
            docs += [line.strip() for line in lines if line.strip()]
    if not docs:
        raise CorpusError(f"corpus {', '.join(map(str, paths))}: no documents")
    return docs


def corpus_digest(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.hexdigest()


def is_held_out(doc: str, percent: int) -> bool:
    return int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) % 100 < percent


def split_documents(docs: list[str], held_out_percent: int) -> tuple[list[str], list[str]]:
    """(train, held_out): a document is held out by its hash, so the split never depends on file order."""
    train = [d for d in docs if not is_held_out(d, held_out_percent)]
    held = [d for d in docs if is_held_out(d, held_out_percent)]
    if not train or not held:
        raise CorpusError(f"the corpus has too few documents ({len(docs)}) for a train / held-out split")
    return train, held


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Causal tokenizers often lack a pad token: pad with end-of-text (padding is masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], seq_len: int) -> Batch:
    enc = tokenizer(list(docs), padding="longest", truncation=True, max_length=seq_len, return_tensors="pt")
    return Batch(enc["input_ids"], enc["attention_mask"])


def batch_at(docs: Sequence[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The documents of training step ``step``: epoch-wise shuffles from ``seed``, a pure function of the step."""
    n = len(docs)
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(docs[int(order[index])])
    return out


def eval_batches(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], batch_size: int,
                 seq_len: int) -> Iterator[Batch]:
    for start in range(0, len(docs), batch_size):
        yield encode(tokenizer, docs[start : start + batch_size], seq_len)
