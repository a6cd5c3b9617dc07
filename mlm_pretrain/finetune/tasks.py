"""Downstream tasks: the GLUE registry, local task directories and files, and how each is scored.

A `Task` holds its splits in memory as columns (texts, and a second text column for pair tasks), with
labels already mapped to class ids (or floats for regression). Three roles matter to fine-tuning:
`train`, `validation` (early stopping and model selection) and `scored` (the splits whose metrics are
reported: `test` for a local task that has one; the GLUE dev sets for GLUE, whose test labels are
hidden). When a task has no separate validation split, a seeded slice of train is held out for it.

A GLUE task comes from the Hub's `nyu-mll/glue` through `datasets` (and its cache), or, with
`MLM_PRETRAIN_GLUE_DIR` set, from a local copy in that repository's layout: `<task>/<split>-*.parquet`
(`sst2/train-00000-of-00001.parquet`, `mnli/validation_matched-00000-of-00001.parquet`). Its test
splits are never read: their labels are hidden (-1), and a split holding a -1 is refused, not scored.

A local task is checked whole before any training: a malformed line, a missing field, an empty split,
labels that mix numbers and class names, or a validation/test label that train never has is an
`InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from mlm_pretrain.errors import InputError

METRICS = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")
REGRESSION_METRICS = ("pearsonr", "spearmanr")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0  # fixed, so every seed and the baseline see the same train/validation cut
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
GLUE_REPO = "nyu-mll/glue"
GLUE_DIR_ENV = "MLM_PRETRAIN_GLUE_DIR"  # a local copy of GLUE_REPO, read in its place


@dataclass(frozen=True)
class GlueSpec:
    text_fields: tuple[str, ...]
    # the names of class ids 0, 1, ..., as the Hub's features have them; None: regression
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    scored_splits: tuple[str, ...] = ("validation",)


_ENTAILMENT = ("entailment", "not_entailment")
GLUE_TASKS = {
    "cola": GlueSpec(("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": GlueSpec(("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "stsb": GlueSpec(("sentence1", "sentence2"), None, ("pearsonr", "spearmanr")),
    "qqp": GlueSpec(("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "mnli": GlueSpec(
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        ("validation_matched", "validation_mismatched"),
    ),
    "qnli": GlueSpec(("question", "sentence"), _ENTAILMENT, ("accuracy",)),
    "rte": GlueSpec(("sentence1", "sentence2"), _ENTAILMENT, ("accuracy",)),
    "wnli": GlueSpec(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}


@dataclass
class Split:
    texts: list[str]
    pair_texts: list[str] | None  # second sentence of pair tasks
    labels: list  # class ids (int) or targets (float)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> Split:
        pairs = None if self.pair_texts is None else [self.pair_texts[i] for i in indices]
        return Split([self.texts[i] for i in indices], pairs, [self.labels[i] for i in indices])


@dataclass
class Task:
    name: str
    train: Split
    validation: Split
    scored: dict[str, Split]
    label_names: list[str] | None  # None for regression
    metrics: tuple[str, ...]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.train.pair_texts is not None


def load_task(
    name_or_path: str,
    *,
    train: str | None = None,
    validation: str | None = None,
    test: str | None = None,
    text_fields: tuple[str, ...] | None = None,
    label_field: str = "label",
    metric: str | None = None,
) -> Task:
    """A GLUE task name, a task directory (train/validation/test files), or explicit split files.

    With `train` given, `name_or_path` is only the task's name. `metric` overrides the default choice.
    """
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if train is not None:
        files = {
            "train": Path(train),
            "validation": validation and Path(validation),
            "test": test and Path(test),
        }
        return _load_local(name_or_path, files, text_fields, label_field, metric)
    path = Path(name_or_path)
    if path.is_dir():
        files = {split: _find_split_file(path, split) for split in ("train", "validation", "test")}
        if files["train"] is None:
            raise InputError(
                f"{path}: no train file (train{{{','.join(FILE_SUFFIXES)}}}) in the task directory"
            )
        return _load_local(path.name, files, text_fields, label_field, metric)
    if name_or_path.lower() in GLUE_TASKS:
        return _load_glue(name_or_path.lower(), metric)
    raise InputError(
        f"task {name_or_path!r}: not a directory, and not a GLUE task ({', '.join(GLUE_TASKS)}); "
        "give a task directory, or --train FILE with --text-fields and --label-field"
    )


def _find_split_file(directory: Path, split: str) -> Path | None:
    for suffix in FILE_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL/JSON-lines, CSV or TSV file; at least one."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Excel's CSV) is no part of the first key
    except UnicodeDecodeError as err:
        line_no = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line_no}: not UTF-8 text ({err.reason})") from None
    rows = _read_csv(path, text) if path.suffix in (".csv", ".tsv") else _read_json_lines(path, text)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader files the cells beyond the header's names under None
                raise InputError(
                    f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells, "
                    f"the header names {len(reader.fieldnames)}"
                )
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise InputError(f"{path}:{reader.line_num}: not a valid {path.suffix[1:]} line ({err})") from None
    return rows


def _read_json_lines(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    # split on newlines only: str.splitlines would also split on U+2028, which JSON strings may hold
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{line_no}: not a JSON line ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def _guess_text_fields(path: Path, row: dict) -> tuple[str, ...]:
    for fields in (("sentence1", "sentence2"), ("text",), ("sentence",)):
        if all(name in row for name in fields):
            return fields
    raise InputError(
        f"{path}: cannot tell the text field(s) from the keys {sorted(row)}; give --text-fields "
        "(one field, or two comma-separated for sentence pairs)"
    )


def _parse_label(value, where: str) -> int | float | str:
    """JSON numbers keep their type; CSV strings become int or float when they parse as such."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        raise InputError(f"{where}: label {json.dumps(value)} is neither a number nor a class name")
    label = value
    if not isinstance(value, int | float):
        label = text = str(value).strip()
        for kind in (int, float):
            try:
                label = kind(text)
                break
            except ValueError:
                pass
    if isinstance(label, float) and not math.isfinite(label):  # a NaN target poisons every loss
        raise InputError(f"{where}: label {value!r} is not a finite number")
    return label


@dataclass
class _Rows:
    """One split file's columns as read: labels not yet class ids, line numbers kept for messages."""

    path: Path
    texts: list[str]
    pairs: list[str] | None
    labels: list
    lines: list[int]


def _read_split(path: Path, text_fields: tuple[str, ...], label_field: str) -> _Rows:
    rows = _Rows(path, [], [] if len(text_fields) == 2 else None, [], [])
    for line_no, row in _read_rows(path):
        for name in (*text_fields, label_field):
            if row.get(name) is None or (name == label_field and str(row[name]).strip() == ""):
                raise InputError(f"{path}:{line_no}: missing field {name!r} (keys: {sorted(row)})")
        rows.texts.append(str(row[text_fields[0]]))
        if rows.pairs is not None:
            rows.pairs.append(str(row[text_fields[1]]))
        rows.labels.append(_parse_label(row[label_field], f"{path}:{line_no}"))
        rows.lines.append(line_no)
    return rows


def _check_labels(raw: dict[str, _Rows], label_field: str) -> list[str] | None:
    """The class names, as train has them, or None for regression (any float label). Labels that mix
    numbers and class names are refused, and so is a validation or test label that train never has: it
    would be scored but never learnt."""
    located = [
        (f"{rows.path}:{line}", label)
        for rows in raw.values()
        for line, label in zip(rows.lines, rows.labels, strict=True)
    ]
    named = [isinstance(label, str) for _, label in located]
    if any(named) and not all(named):
        first, other = located[0], located[named.index(not named[0])]
        raise InputError(
            f"field {label_field!r} mixes numbers and class names: {first[0]} has {first[1]!r}, "
            f"{other[0]} has {other[1]!r}"
        )
    if any(isinstance(label, float) for _, label in located):
        return None
    train = raw["train"]
    label_names = sorted({str(label) for label in train.labels}, key=_natural_key)
    if len(label_names) < 2:
        raise InputError(
            f"{train.path}: every row has the label {train.labels[0]!r}; a classifier needs two classes"
        )
    for split, rows in raw.items():
        if split == "train":
            continue
        unseen = [
            (line, label)
            for line, label in zip(rows.lines, rows.labels, strict=True)
            if str(label) not in label_names
        ]
        if unseen:
            line, label = unseen[0]
            lacking = sorted({str(label) for _, label in unseen}, key=_natural_key)
            raise InputError(
                f"{rows.path}:{line}: label {label!r} never occurs in {train.path}, whose labels are "
                f"{', '.join(label_names)} (labels train lacks, on {len(unseen)} of the "
                f"{len(rows.labels)} rows here: {', '.join(lacking)})"
            )
    return label_names


def _load_local(
    name: str,
    files: dict[str, Path | None],
    text_fields: tuple[str, ...] | None,
    label_field: str,
    metric: str | None,
) -> Task:
    if text_fields is None:
        text_fields = _guess_text_fields(files["train"], _read_rows(files["train"])[0][1])
    if len(text_fields) not in (1, 2):
        raise InputError(f"--text-fields: expected one or two field names, got {len(text_fields)}")
    raw = {split: _read_split(path, text_fields, label_field) for split, path in files.items() if path}
    scored_name = "test" if "test" in raw else "validation"
    if scored_name not in raw:
        raise InputError(f"task {name!r}: needs a test or a validation file to score on")
    label_names = _check_labels(raw, label_field)
    regression = label_names is None
    to_id = {name: i for i, name in enumerate(label_names or [])}

    def split_of(rows: _Rows) -> Split:
        targets = [float(v) for v in rows.labels] if regression else [to_id[str(v)] for v in rows.labels]
        return Split(rows.texts, rows.pairs, targets)

    splits = {split: split_of(rows) for split, rows in raw.items()}
    notes = []
    train_split = splits["train"]
    validation_split = splits.get("validation") if scored_name == "test" else None
    if validation_split is None:
        if len(train_split) < 2:
            raise InputError(
                f"{files['train']}: {len(train_split)} row: too few to hold out a validation split; "
                "give a validation file"
            )
        train_split, validation_split = holdout(train_split, HOLDOUT_FRACTION, HOLDOUT_SEED)
        notes.append(f"no validation split: {len(validation_split)} train rows held out for early stopping")
    metrics = _pick_metrics(regression, train_split.labels, metric)
    return Task(
        name=name,
        train=train_split,
        validation=validation_split,
        scored={scored_name: splits[scored_name]},
        label_names=label_names,
        metrics=metrics,
        source=str(files["train"].parent if files["train"] else ""),
        notes=notes,
    )


def _natural_key(label: str) -> tuple:
    """Class ids in numeric order when the labels are numbers ("2" before "10"), else alphabetical."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _pick_metrics(regression: bool, train_labels: list, metric: str | None) -> tuple[str, ...]:
    """Pearson/Spearman for regression; F1 for imbalanced binary tasks (minority < 25%); else accuracy."""
    if metric is not None:
        return (metric,)
    if regression:
        return REGRESSION_METRICS
    classes = set(train_labels)
    if len(classes) == 2 and min(train_labels.count(c) for c in classes) < 0.25 * len(train_labels):
        return ("f1",)
    return ("accuracy",)


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held out): a seeded random `fraction` of the rows, at least one on each side."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    n_out = min(max(1, round(fraction * len(order))), len(order) - 1)
    return split.subset(sorted(order[n_out:])), split.subset(sorted(order[:n_out]))


def _load_glue(name: str, metric: str | None) -> Task:
    """A GLUE task from a local copy of `nyu-mll/glue` (`MLM_PRETRAIN_GLUE_DIR`), else from the Hub
    through `datasets`, which needs network access or a warm cache (`HF_DATASETS_OFFLINE=1`)."""
    spec = GLUE_TASKS[name]
    fields = [*spec.text_fields, "label"]
    splits = ("train", *spec.scored_splits)  # never test: its labels are hidden
    local = os.environ.get(GLUE_DIR_ENV)
    if local:
        columns = {split: _read_glue_copy(Path(local), name, split, fields) for split in splits}
        source = str(Path(local) / name)
    else:
        import datasets

        try:
            dataset = datasets.load_dataset(GLUE_REPO, name)
        except Exception as err:  # offline, or the Hub unreachable: say which task and why
            raise InputError(
                f"GLUE task {name!r}: cannot load {GLUE_REPO} from the Hub ({err}); offline, set "
                f"{GLUE_DIR_ENV} to a local copy of it"
            ) from err
        columns = {split: dataset[split].select_columns(fields).to_dict() for split in splits}
        source = GLUE_REPO

    def split_of(split_name: str) -> Split:
        column = columns[split_name]
        labels = column["label"]
        valid = range(len(spec.label_names)) if spec.label_names else None
        bad = [label for label in labels if label < 0 or (valid is not None and label not in valid)]
        if bad:
            hidden = " (GLUE hides its test labels as -1)" if -1 in bad else ""
            raise InputError(
                f"GLUE task {name!r} ({source}), split {split_name}: label {bad[0]} on {len(bad)} of "
                f"{len(labels)} rows{hidden}; it can be neither trained on nor scored"
            )
        pairs = column[spec.text_fields[1]] if len(spec.text_fields) == 2 else None
        targets = labels if spec.label_names else [float(v) for v in labels]
        return Split(column[spec.text_fields[0]], pairs, targets)

    train_split, validation_split = holdout(split_of("train"), HOLDOUT_FRACTION, HOLDOUT_SEED)
    return Task(
        name=name,
        train=train_split,
        validation=validation_split,
        scored={split: split_of(split) for split in spec.scored_splits},
        label_names=list(spec.label_names) if spec.label_names else None,
        metrics=(metric,) if metric else spec.metrics,
        source=source,
        notes=["GLUE test labels are hidden: scored on the dev set(s); early stopping on 10% of train"],
    )


def _read_glue_copy(root: Path, name: str, split: str, fields: list[str]) -> dict[str, list]:
    """`fields` of one split of a local copy of `nyu-mll/glue`: the rows of `<root>/<name>/<split>-*.parquet`
    as columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not root.is_dir():
        raise InputError(f"{GLUE_DIR_ENV}={root}: no such directory")
    files = sorted((root / name).glob(f"{split}-*.parquet"))
    if not files:
        raise InputError(
            f"{GLUE_DIR_ENV}={root}: no {name}/{split}-*.parquet; a copy of {GLUE_REPO} is laid out as "
            f"<task>/<split>-00000-of-00001.parquet (hf download {GLUE_REPO} --repo-type dataset)"
        )
    tables = []
    for file in files:
        columns = pq.ParquetFile(file).schema_arrow.names
        missing = [f for f in fields if f not in columns]
        if missing:
            raise InputError(f"{file}: no column {missing[0]!r}; columns: {columns}")
        tables.append(pq.read_table(file, columns=fields))
    return pa.concat_tables(tables).to_pydict()
