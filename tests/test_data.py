"""Bad data files get errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.data import DataError, labels_of, load_examples

LABELS = ["animal", "plant"]


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_classification_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "a.jsonl", b'{"text": "a cat", "label": "animal"}\n\n{"text": "oak", "label": "plant"}\n')
    csv = write(tmp_path / "a.csv", b'text,label\n"a cat, small",animal\noak,plant\n')
    for path in (jsonl, csv):
        examples = load_examples(path, "classification", LABELS)
        assert [(e.label) for e in examples] == [0, 1]
        assert labels_of(path) == LABELS
    assert load_examples(csv, "classification", LABELS)[0].text == "a cat, small"


def test_causal_lm_text_and_prompt_completion(tmp_path: Path) -> None:
    path = write(tmp_path / "lm.jsonl", b'{"text": "hello"}\n{"prompt": "Q: 2+2?", "completion": " 4"}\n')
    plain, qa = load_examples(path, "causal-lm")
    assert (plain.text, plain.completion) == ("hello", None)
    assert (qa.text, qa.completion) == ("Q: 2+2?", " 4")


@pytest.mark.parametrize(
    ("content", "task", "message"),
    [
        (b'{"text": "x", "label": "animal"}\n{"label": "plant"}\n', "classification",
         "a.jsonl:2: missing field 'text'"),
        (b"", "classification", "a.jsonl: the file has no examples"),
        (b'{"text": "x", "label": "fungus"}\n', "classification", "a.jsonl:1: unknown label 'fungus'"),
        (b'{"text": "caf\xe9"}\n', "causal-lm", "a.jsonl:1: invalid UTF-8"),
        (b'{"text": "ok"}\n{"text": "' + b"x" * 200 + b'"}\n', "causal-lm", "a.jsonl:2: line is"),
        (b'{"text": "ok"}\n{not json}\n', "causal-lm", "a.jsonl:2: not valid JSON"),
        (b'["a list"]\n', "causal-lm", "a.jsonl:1: each line must be a JSON object"),
        (b'{"prompt": "only a prompt"}\n', "causal-lm", "a.jsonl:1: missing field 'completion'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, content: bytes, task: str, message: str) -> None:
    path = write(tmp_path / "a.jsonl", content)
    with pytest.raises(DataError) as error:
        load_examples(path, task, LABELS, max_line_bytes=100)
    assert message in str(error.value)


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", b"text,label\nok,animal\n\nbad,fungus\n")
    with pytest.raises(DataError, match=r"a.csv:4: unknown label 'fungus'"):
        load_examples(path, "classification", LABELS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl", "causal-lm")


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv"])
def test_the_label_scan_names_the_file_and_line(tmp_path: Path, name: str) -> None:
    content = (b'{"text": "a cat", "label": "animal"}\n{"text": "oak" "label": "plant"}\n' if name.endswith("jsonl")
               else b'text,label\n"a cat,animal\noak,plant\n')
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"{name}:2: not valid"):
        labels_of(path)
    with pytest.raises(DataError, match=rf"{name}:2: not valid"):
        load_examples(path, "classification", LABELS)
