"""Task data: JSONL or CSV files, validated line by line, with errors that name the file and line."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from emulator.errors import EmulatorError

TASK_NAMES = ("causal-lm", "classification", "multiple-choice")
MAX_CHOICES = 16
MAX_LINE_BYTES = 1 << 20


class DataError(EmulatorError):
    """A data file is unusable; the message names the file and, where it applies, the line."""

    bad_input = True

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass(frozen=True)
class Example:
    text: str  # the whole text (causal LM, classification) or the prompt (prompt + completion)
    completion: str | None = None  # causal LM with loss on the completion only; multiple choice: the answer
    label: int | None = None  # classification: index into the job's label list
    choices: tuple[str, ...] = ()  # multiple choice: scored by their log-likelihood given ``text``
    answer: int | None = None  # multiple choice: index of the right choice


def _record(path: Path, line_no: int, record: dict[str, object], task: str, labels: list[str] | None) -> Example:
    def field(name: str) -> str:
        value = record.get(name)
        if value is None:
            raise DataError(path, f"missing field {name!r}", line_no)
        if not isinstance(value, str | int | float):
            raise DataError(path, f"field {name!r} must be a string", line_no)
        return str(value)

    if task == "classification":
        text, label = field("text"), field("label")
        if labels is None:
            raise DataError(path, "classification needs the job's label list")
        if label not in labels:
            raise DataError(path, f"unknown label {label!r}; the job's labels are {', '.join(labels)}", line_no)
        return Example(text=text, label=labels.index(label))
    if task == "multiple-choice":
        return _choice_record(path, line_no, record, field("prompt"))
    if "prompt" in record or "completion" in record:
        return Example(text=field("prompt"), completion=field("completion"))
    return Example(text=field("text"))


def _choice_record(path: Path, line_no: int, record: dict[str, object], prompt: str) -> Example:
    """``{"prompt": str, "choices": [str, ...], "answer": int}``: training sees the prompt and the right choice."""
    choices, answer = record.get("choices"), record.get("answer")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise DataError(path, "field 'choices' must be a list of non-empty strings", line_no)
    if not 2 <= len(choices) <= MAX_CHOICES:
        raise DataError(path, f"field 'choices' must hold 2 to {MAX_CHOICES} choices, got {len(choices)}", line_no)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(path, f"field 'answer' must be an index into 'choices' (0..{len(choices) - 1}), "
                              f"got {answer!r}", line_no)
    return Example(text=prompt, completion=choices[answer], choices=tuple(choices), answer=answer)


def _lines(path: Path, max_line_bytes: int) -> list[tuple[int, str]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise DataError(path, "no such file") from error
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if len(line) > max_line_bytes:
            raise DataError(path, f"line is {len(line)} bytes, over the {max_line_bytes}-byte cap", number)
        try:
            lines.append((number, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as error:
            raise DataError(path, f"invalid UTF-8 at byte {error.start}", number) from error
    return lines


def _rows(path: Path, max_line_bytes: int) -> list[tuple[int, dict[str, object]]]:
    """Every record of a ``.csv`` (after its header) or ``.jsonl`` file, with its line number."""
    lines = _lines(path, max_line_bytes)
    rows: list[tuple[int, dict[str, object]]] = []
    if path.suffix == ".csv":
        numbered = [(n, text) for n, text in lines if text.strip()]
        reader = csv.DictReader(io.StringIO("\n".join(text for _, text in numbered)), strict=True)
        records = iter(reader)
        for line_no, _ in numbered[1:]:
            try:
                row = next(records)
            except StopIteration:  # a quoted field spanned lines: fewer records than lines
                break
            except csv.Error as error:
                raise DataError(path, f"not valid CSV: {error}", line_no) from error
            rows.append((line_no, dict(row)))
        return rows
    for line_no, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(path, f"not valid JSON: {error.msg}", line_no) from error
        if not isinstance(record, dict):
            raise DataError(path, "each line must be a JSON object", line_no)
        rows.append((line_no, record))
    return rows


def load_examples(path: Path | str, task: str, labels: list[str] | None = None,
                  max_line_bytes: int = MAX_LINE_BYTES) -> list[Example]:
    """Read a ``.jsonl`` or ``.csv`` file of ``task`` examples."""
    path = Path(path)
    if task not in TASK_NAMES:
        raise DataError(path, f"task must be one of {', '.join(TASK_NAMES)}, got {task!r}")
    examples = [_record(path, line_no, row, task, labels) for line_no, row in _rows(path, max_line_bytes)]
    if not examples:
        raise DataError(path, "the file has no examples")
    return examples


def labels_of(path: Path | str, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """The sorted label set of a classification file (the job fixes it once, for every owner)."""
    path = Path(path)
    found = {str(row["label"]) for _, row in _rows(path, max_line_bytes) if row.get("label") is not None}
    if not found:
        raise DataError(path, "no labels found")
    return sorted(found)
