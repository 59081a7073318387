"""Build two multiple-choice tasks from WordNet 3.0: ``wordnet-definitions`` and ``wordnet-hypernyms``.

Source: the WordNet 3.0 database files (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``, ``index.*`` and
``cntlist.rev``) from Debian's ``wordnet-base`` package (``apt-get install wordnet-base`` puts them under
``/usr/share/wordnet``), read with the small parser below (the format is documented in wndb(5WN) and cntlist(5WN);
nothing is downloaded). Licence: the WordNet 3.0 licence, a permissive notice licence from Princeton University
that allows use, copying, modification and redistribution provided the copyright notice and disclaimer stay with
every copy: this script copies it, from the header of ``data.noun``, to ``LICENSE-WordNet`` beside the tasks.

Each task is written as ``<out>/<task>/train.jsonl`` and ``<out>/<task>/eval.jsonl``, one object per line:
``{"prompt": str, "choices": [str, ...], "answer": int}``. A model scores each choice by the log-likelihood of its
tokens given the prompt, so every choice starts with a space and no prompt ends with one.

- ``wordnet-definitions``: "Definition: <gloss>\\nWord:" and four words of the same part of speech (noun, verb or
  adjective): the common word whose most frequent sense has that gloss (quoted examples dropped), and three other
  common words from the same lexicographer file (semantic class).
- ``wordnet-hypernyms``: "A barge is a kind of" and four category nouns: the nearest common-word hypernym of the
  noun's most frequent sense, and three other categories that are neither above nor below it.

"Common" means seen often enough in WordNet's semantically tagged concordance (``cntlist.rev``). Train and eval are
disjoint by target word (one item per target word). The output is deterministic for a given ``--seed``.

    python examples/tasks/make_wordnet_tasks.py [--wordnet /usr/share/wordnet] [--out emulator/tasks] \\
        [--train 2000] [--eval 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "emulator" / "tasks"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# Sense-key synset types (cntlist(5WN)): 1 noun, 2 verb, 3 adjective, 4 adverb, 5 adjective satellite.
SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
WORD = re.compile(r"[a-z]{3,12}")
N_CHOICES = 4


@dataclass
class Synset:
    offset: str
    lexfile: str  # lexicographer file number, lexnames(5WN): the broad semantic class (noun.animal, verb.motion...)
    pos: str  # n, v, a (adjective satellites are folded into a) or r
    lemmas: list[str]  # lower case
    gloss: str
    # (pointer symbol, source word number, target synset offset, target pos, target word number); numbers are 1-based,
    # 0 for a pointer between whole synsets.
    pointers: list[tuple[str, int, str, str, int]] = field(default_factory=list)
    proper: set[str] = field(default_factory=set)  # lemmas written with a capital letter here (names)


def strip_marker(lemma: str) -> str:
    """A data-file lemma without its adjective syntactic marker, ``(a)``, ``(p)`` or ``(ip)``."""
    return re.sub(r"\((a|p|ip)\)$", "", lemma).lower()


def read_data(path: Path, pos: str) -> dict[str, Synset]:
    """Every synset of one data file, by offset; lines starting with two spaces are the licence header."""
    synsets: dict[str, Synset] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        fields_text, gloss = line.split("|", 1)
        fields = fields_text.split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        words = [fields[4 + 2 * i] for i in range(w_cnt)]
        lemmas = [strip_marker(word) for word in words]
        proper = {lemma for word, lemma in zip(words, lemmas, strict=True) if word != word.lower()}
        i = 4 + 2 * w_cnt
        p_cnt = int(fields[i])
        pointers = []
        for j in range(p_cnt):
            symbol, target, target_pos, source_target = fields[i + 1 + 4 * j : i + 5 + 4 * j]
            pointers.append(
                (
                    symbol,
                    int(source_target[:2], 16),
                    target,
                    "a" if target_pos == "s" else target_pos,
                    int(source_target[2:], 16),
                )
            )
        synsets[offset] = Synset(offset, fields[1], pos, lemmas, gloss.strip(), pointers, proper)
    return synsets


def read_index(path: Path) -> dict[str, list[str]]:
    """Synset offsets of every lemma of one index file, most frequent sense first."""
    senses: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
        senses[lemma] = fields[4 + p_cnt + 2 :][:synset_cnt]
    return senses


def read_counts(path: Path) -> dict[tuple[str, str], int]:
    """Semantic-concordance tag counts summed over the senses of each (lemma, pos): how common a word is."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in path.read_text(encoding="utf-8").splitlines():
        sense_key, _, tag_cnt = line.split()
        lemma, lex_sense = sense_key.split("%", 1)
        counts[(lemma, SENSE_KEY_POS[lex_sense[0]])] += int(tag_cnt)
    return counts


def definition(gloss: str) -> str:
    """A gloss up to its first quoted example, without trailing separators."""
    text = re.split(r';?\s*"', gloss, maxsplit=1)[0]
    return re.sub(r"\s+", " ", text).strip().rstrip(";:,").strip()


def mentions(text: str, word: str) -> bool:
    """Whether ``text`` contains ``word`` or an obvious relative of it (same first five letters, or an inflection)."""
    for token in re.findall(r"[a-z]+", text.lower()):
        if token == word or (len(word) >= 5 and token.startswith(word[:5])):
            return True
        if token.startswith(word) and len(token) <= len(word) + 3:
            return True
        if word.startswith(token) and len(token) >= 4 and len(word) <= len(token) + 3:
            return True
    return False


@dataclass
class WordNet:
    synsets: dict[str, dict[str, Synset]]  # pos -> offset -> synset
    senses: dict[str, dict[str, list[str]]]  # pos -> lemma -> offsets
    counts: dict[tuple[str, str], int]

    @classmethod
    def load(cls, root: Path) -> WordNet:
        synsets = {pos: read_data(root / f"data.{name}", pos) for pos, name in POS_FILES.items()}
        senses = {pos: read_index(root / f"index.{name}") for pos, name in POS_FILES.items()}
        return cls(synsets, senses, read_counts(root / "cntlist.rev"))

    def common(self, pos: str, min_count: int) -> list[str]:
        """Plain lower-case single words (not names) of a part of speech seen at least ``min_count`` times, sorted."""
        return sorted(
            lemma
            for lemma in self.senses[pos]
            if WORD.fullmatch(lemma)
            and self.counts.get((lemma, pos), 0) >= min_count
            and lemma not in self.first(pos, lemma).proper
        )

    def first(self, pos: str, lemma: str) -> Synset:
        """The most frequent sense of a lemma."""
        return self.synsets[pos][self.senses[pos][lemma][0]]

    def synonyms(self, pos: str, lemma: str) -> set[str]:
        """Every lemma sharing a synset with ``lemma``, itself included."""
        found = {lemma}
        for offset in self.senses[pos].get(lemma, []):
            found.update(self.synsets[pos][offset].lemmas)
        return found


def distractors(rng: random.Random, pool: list[str], exclude: set[str], k: int, text: str = "") -> list[str]:
    """``k`` different words of ``pool``, none in ``exclude`` nor mentioned in ``text``."""
    chosen: list[str] = []
    while len(chosen) < k:
        word = rng.choice(pool)
        if word not in exclude and word not in chosen and not mentions(text, word):
            chosen.append(word)
    return chosen


def item(rng: random.Random, prompt: str, answer: str, wrong: list[str]) -> dict[str, object]:
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"prompt": prompt, "choices": [" " + c for c in choices], "answer": choices.index(answer)}


def definition_items(wn: WordNet, rng: random.Random, min_count: int) -> list[tuple[str, dict[str, object]]]:
    """(target word, item) for every usable common noun, verb and adjective.

    The distractors are common words of the same part of speech whose most frequent sense is in the same
    lexicographer file as the target's (another animal for an animal, another motion verb for a motion verb).
    """
    out: list[tuple[str, dict[str, object]]] = []
    for pos in ("n", "v", "a"):
        pool = wn.common(pos, min_count)
        by_lexfile: dict[str, list[str]] = defaultdict(list)
        for lemma in pool:
            by_lexfile[wn.first(pos, lemma).lexfile].append(lemma)
        for lemma in pool:
            synset = wn.first(pos, lemma)
            text = definition(synset.gloss)
            same_class = by_lexfile[synset.lexfile]
            if not 3 <= len(text.split()) <= 25 or mentions(text, lemma) or len(same_class) < 50:
                continue
            exclude = wn.synonyms(pos, lemma) | set(synset.lemmas)
            wrong = distractors(rng, same_class, exclude, N_CHOICES - 1, text)
            out.append((lemma, item(rng, f"Definition: {text}\nWord:", lemma, wrong)))
    return out


# Category words too vague to be a useful answer to "A ... is a kind of".
VAGUE = frozenset(
    "abstraction act action activity attribute being cause change collection communication condition content "
    "entity event group information matter measure object occurrence part phenomenon process property quality "
    "relation state thing unit whole".split()
)


def hypernym_items(
    wn: WordNet, rng: random.Random, min_count: int, min_label_count: int
) -> list[tuple[str, dict[str, object]]]:
    """(target noun, item): a common noun's most frequent sense and its nearest common-word hypernym.

    The answer is the first plain single-word lemma, seen at least ``min_label_count`` times, of the nearest
    hypernym (``@`` or instance ``@i``, up to three levels up) of the target's most frequent sense; targets whose
    category is vague (``VAGUE``) are skipped. The distractors are other targets' categories, drawn with their
    frequency among the answers, that are neither above nor below the target in the hypernym hierarchy.
    """
    nouns = wn.synsets["n"]

    def parents(offset: str) -> list[str]:
        return [t for symbol, _, t, t_pos, _ in nouns[offset].pointers if symbol in ("@", "@i") and t_pos == "n"]

    def ancestors(offsets: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(offsets)
        while stack:
            for parent in parents(stack.pop()):
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    def category(offset: str) -> str | None:
        frontier = parents(offset)
        for _ in range(3):
            for parent in frontier:
                for lemma in nouns[parent].lemmas:
                    if WORD.fullmatch(lemma) and wn.counts.get((lemma, "n"), 0) >= min_label_count:
                        return lemma
            frontier = [grandparent for parent in frontier for grandparent in parents(parent)]
        return None

    labels: dict[str, str] = {}
    for lemma in wn.common("n", min_count):
        label = category(wn.first("n", lemma).offset)
        if label and label not in VAGUE and not mentions(lemma, label) and not mentions(label, lemma):
            labels[lemma] = label
    answers = [labels[lemma] for lemma in sorted(labels)]
    answer_senses = {answer: set(wn.senses["n"][answer]) for answer in set(answers)}
    answer_above = {answer: ancestors(senses) for answer, senses in answer_senses.items()}
    out: list[tuple[str, dict[str, object]]] = []
    for lemma, label in sorted(labels.items()):
        senses = set(wn.senses["n"][lemma])
        above = ancestors(senses)
        exclude = wn.synonyms("n", lemma) | {label}
        exclude |= {a for a in answer_senses if answer_senses[a] & above or senses & answer_above[a]}
        wrong = distractors(rng, answers, exclude, N_CHOICES - 1, lemma)
        article = "An" if lemma[0] in "aeiou" else "A"
        out.append((lemma, item(rng, f"{article} {lemma} is a kind of", label, wrong)))
    return out


def split(
    rng: random.Random, items: Iterable[tuple[str, dict[str, object]]], n_train: int, n_eval: int
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Shuffle the target words, give the first ``n_eval`` words' items to eval and the next to train; a training
    item whose prompt is also an eval prompt (one gloss, two target words) is dropped, so no eval prompt is seen."""
    groups: dict[str, list[dict[str, object]]] = defaultdict(list)
    for key, row in items:
        groups[key].append(row)
    keys = sorted(groups)
    rng.shuffle(keys)
    evaluation: list[dict[str, object]] = []
    train: list[dict[str, object]] = []
    eval_prompts: set[object] = set()
    for key in keys:
        if len(evaluation) < n_eval:
            evaluation.extend(groups[key])
            eval_prompts.update(row["prompt"] for row in groups[key])
        elif len(train) < n_train:
            train.extend(row for row in groups[key] if row["prompt"] not in eval_prompts)
    return train[:n_train], evaluation[:n_eval]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def licence_text(root: Path) -> str:
    """The WordNet 3.0 licence, from the numbered header lines of ``data.noun``."""
    lines = []
    for line in (root / "data.noun").read_text(encoding="utf-8").splitlines():
        if not line.startswith("  "):
            break
        lines.append(re.sub(r"^\s+\d+ ?", "", line).rstrip())
    return "\n".join(lines).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train", type=int, default=2000, help="train items per task")
    parser.add_argument("--eval", type=int, default=500, help="eval items per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wn = WordNet.load(args.wordnet)
    tasks = {
        "wordnet-definitions": definition_items(wn, random.Random(f"{args.seed}/definitions"), min_count=5),
        "wordnet-hypernyms": hypernym_items(
            wn, random.Random(f"{args.seed}/hypernyms"), min_count=3, min_label_count=5
        ),
    }
    for name, items in tasks.items():
        train, evaluation = split(random.Random(f"{args.seed}/{name}/split"), items, args.train, args.eval)
        if len(train) < args.train or len(evaluation) < args.eval:
            parser.error(f"{name}: only {len(train)} train and {len(evaluation)} eval items available")
        write_jsonl(args.out / name / "train.jsonl", train)
        write_jsonl(args.out / name / "eval.jsonl", evaluation)
    (args.out / "LICENSE-WordNet").write_text(licence_text(args.wordnet), encoding="utf-8")


if __name__ == "__main__":
    main()
