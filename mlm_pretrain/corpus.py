"""The streaming corpus: documents from files, directories, globs and Hub datasets, resumable.

`TextStream` yields documents (str) from one or more sources, interleaved by weight, for as many
epochs as asked. The files of one source (a directory or glob) are interleaved too, paced by size, so
that the stream mixes them from its first documents in the proportions the corpus holds them.

Nothing is loaded whole and nothing is cached on disk: files are read line by line (or batch by batch
for Parquet), and the reader position is a byte offset (a row index for Parquet), so
`load_state_dict` seeks straight to it instead of re-reading what came before. The one exception is
gzip, which cannot seek: restoring a `.gz` position decompresses up to it (measured here, on a busy
2-core machine, about 1 s per 30 MB of text), but neither parses nor tokenizes it.

A Hub dataset, `hf:NAME[:CONFIG][@SPLIT]`, is streamed by `datasets`: NAME is a dataset id or a local
directory laid out like a Hub dataset repository (Parquet or JSONL shards under `data/`, named by split,
as `load_dataset(path)` reads it), so a mirror works offline. Its shards are read one after another in
a seeded order that changes every epoch, and its position is the dataset's own `state_dict()`, so it
resumes exactly too. (Not `IterableDataset.shuffle`: its buffer is no part of the state, and a resumed
stream would skip what the buffer held. The block shuffle buffer downstream mixes documents.)

What bad input does (the README lists the same):

stops the run with an `InputError` naming the file (and line)
    a missing path or a glob that matches nothing, an unsupported file type, a truncated or corrupt
    `.gz`, a Parquet/CSV file without the text field, a JSONL file whose first records all lack it,
    a source with no text at all; a Hub dataset that cannot be streamed (not found, offline and not
    cached, no such config or split) or has no text field.
skipped, counted in `stats` and logged (the first few with file and line)
    an empty file, a malformed JSONL line, a JSONL record without the text field (or with a non-string
    one), a JSONL line or a CSV record longer than `max_line_bytes`, a CSV record csv cannot parse.
repaired, counted
    invalid UTF-8 (decoded with U+FFFD replacements), a text line longer than `max_line_bytes`
    (cut at whitespace into several documents, so memory stays bounded), CRLF line ends and a UTF-8
    BOM (stripped silently).

A CSV record is cut from the file here (whole lines; a quoted field may hold line ends) and parsed by
csv, so its fields may be as long as `max_line_bytes` and a resumed reader seeks to a record's start.
"""

from __future__ import annotations

import copy
import csv
import glob
import gzip
import heapq
import io
import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".tsv")
HUB_PREFIX = "hf:"
WARNINGS_PER_KIND = 5  # log the first few occurrences of each kind of bad input, count the rest
FIELD_PROBE = 100  # a JSONL file whose first FIELD_PROBE records all lack the field is an error
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)
# the files of a source read at once: each holds a file handle (and a Parquet batch), so a source of
# thousands of shards is interleaved this many files at a time
INTERLEAVED_FILES = 32
PACKAGE_DATA = Path(__file__).parent / "data"
# the small public-domain corpus shipped in the package, so the default job and tests run anywhere
ALIASES = {
    "@sample": str(PACKAGE_DATA / "corpus"),  # Austen (Emma) and Moby Dick, 1.8 MB of text
    "@sample-validation": str(PACKAGE_DATA / "validation.jsonl"),  # held-out paragraphs of the same books
}


@dataclass
class Source:
    """One corpus source: local paths (files, directories, globs) or a Hub dataset
    `hf:NAME[:CONFIG][@SPLIT]`, NAME a dataset id or a local directory in a Hub dataset's layout."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    split: str | None = None  # Hub datasets only: the path's @SPLIT, else train
    interleave_files: bool = True  # False: one file after another, in the epoch's order

    def __post_init__(self) -> None:
        self.path = ALIASES.get(self.path, self.path)
        if not self.is_hub:
            if self.split is not None:
                raise InputError(f"corpus source {self.path}: `split` is for Hub datasets (hf:NAME) only")
            return
        named = _hub_parts(self.path)[2]
        if named is not None and self.split is not None and named != self.split:
            raise InputError(f"corpus source {self.path}: split {self.split!r}, but the path names {named!r}")
        self.split = self.split or named or "train"

    @property
    def is_hub(self) -> bool:
        return self.path.startswith(HUB_PREFIX)

    @property
    def hub_dataset(self) -> tuple[str, str | None]:
        """(NAME, CONFIG or None) of `hf:NAME[:CONFIG][@SPLIT]`; NAME with `~` expanded."""
        name, config, _ = _hub_parts(self.path)
        return os.path.expanduser(name), config


def _hub_parts(path: str) -> tuple[str, str | None, str | None]:
    """(NAME, CONFIG, SPLIT) of `hf:NAME[:CONFIG][@SPLIT]`, None for a part not given."""
    spec, at, split = path[len(HUB_PREFIX) :].rpartition("@")
    if not at:
        spec, split = split, None
    name, _, config = spec.partition(":")
    return name, config or None, split or None


def as_sources(
    specs: Sequence[str | Source | dict], weights: Sequence[float] | None = None, text_field: str = "text"
) -> list[Source]:
    """Normalise paths, `Source`s or recipe dicts (`{path, weight, text_field, split, interleave_files}`)
    to `Source`s."""
    if weights is not None and len(weights) != len(specs):
        raise InputError(f"{len(weights)} corpus weights given for {len(specs)} corpus sources")
    sources = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Source):
            source = spec
        elif isinstance(spec, dict):
            unknown = set(spec) - {"path", "weight", "text_field", "split", "interleave_files"}
            if unknown or "path" not in spec:
                raise InputError(
                    f"corpus source {spec}: needs `path`; optional keys weight, text_field, split, "
                    "interleave_files" + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
                )
            source = Source(**{"text_field": text_field, **spec})
        else:
            source = Source(str(spec), text_field=text_field)
        if weights is not None:
            source.weight = float(weights[i])
        if source.weight <= 0:
            raise InputError(f"corpus source {source.path}: weight must be > 0, got {source.weight}")
        sources.append(source)
    if not sources:
        raise InputError("no corpus source given")
    return sources


def expand_paths(path: str) -> list[Path]:
    """The files a path names: itself, the supported files under a directory, or a glob's matches."""
    if any(ch in path for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not matches:
            raise InputError(f"corpus glob matches no file: {path}")
        files = matches
    elif os.path.isdir(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise InputError(f"corpus directory holds no {'/'.join(SUFFIXES)} file: {path}")
    elif os.path.isfile(path):
        files = [Path(path)]
    else:
        raise InputError(f"corpus path not found: {path}")
    for file in files:
        if not file.name.endswith(SUFFIXES):
            raise InputError(f"{file}: unsupported corpus file type; supported: {', '.join(SUFFIXES)}")
    return files


@dataclass
class _Position:
    """Where a source's reader stands: the epoch, the group of files being interleaved (in that epoch's
    order) and where each file of the group stands."""

    epoch: int = 0
    group: int = 0
    # [offset, line] after the last document read, None once read to the end; empty until the group starts.
    # The offset counts bytes for text formats (decompressed for gzip), rows for Parquet.
    files: list[list[int] | None] = field(default_factory=list)
    hub_state: dict | None = None  # the Hub dataset's own state
    done: bool = False


class _FileReader:
    """Reads the documents of one file from a position; `self.offset`/`self.line` point past the last one."""

    def __init__(self, path: Path, text_field: str, max_line_bytes: int, stats: Counter):
        self.path, self.text_field, self.max_line_bytes, self.stats = path, text_field, max_line_bytes, stats
        self.offset = 0
        self.line = 0
        name = path.name
        self.kind = (
            "jsonl"
            if name.endswith((".jsonl", ".jsonl.gz"))
            else "parquet"
            if name.endswith(".parquet")
            else "csv"
            if name.endswith((".csv", ".tsv"))
            else "txt"
        )

    def size(self) -> int:
        """The file's length in the unit of `offset`, which paces the interleaving of a source's files."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        size = self.path.stat().st_size
        if not self.path.name.endswith(".gz") or size < 4:
            return size
        with open(self.path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(f.read(4), "little")
        # gzip's trailer holds the length mod 2**32 (of the last member only): take the least length it
        # allows that is not below the compressed size. Where that is wrong (over 4 GiB, several
        # members) the file is still read whole, only its pace in the mixture is off.
        wraps = max(0, math.ceil((size - trailer) / 2**32))
        return trailer + wraps * 2**32

    def warn(self, kind: str, message: str, line: int | None = None) -> None:
        self.stats[kind] += 1
        if self.stats[kind] <= WARNINGS_PER_KIND:
            log.warning(
                "%s:%d: %s%s",
                self.path,
                self.line if line is None else line,
                message,
                " (further ones are counted, not logged)" if self.stats[kind] == WARNINGS_PER_KIND else "",
            )

    def documents(self, offset: int, line: int) -> Iterator[str]:
        self.offset, self.line = offset, line
        if self.kind == "parquet":
            yield from self._parquet(offset)
            return
        try:
            with gzip.open(self.path, "rb") if self.path.name.endswith(".gz") else open(self.path, "rb") as f:
                if offset:
                    f.seek(offset)
                if self.kind == "txt":
                    yield from self._text(f)
                elif self.kind == "jsonl":
                    yield from self._jsonl(f)
                else:
                    yield from self._csv(f, offset)
        except GZIP_ERRORS as err:
            raise InputError(
                f"{self.path}: truncated or corrupt gzip data after line {self.line} ({err})"
            ) from err

    def _lines(self, f: io.BufferedIOBase) -> Iterator[tuple[bytes, bool]]:
        """(line without its line end, whether it is whole), a line longer than `max_line_bytes` coming
        in pieces cut at whitespace, so memory stays bounded whatever the file holds.

        After a piece, `self.offset` points at the start of the rest (the carry), so a reader restarted
        there reads exactly the bytes this one would have read next.
        """
        carry = b""
        while True:
            chunk = f.readline(self.max_line_bytes - len(carry))
            if not chunk:
                if carry:
                    yield carry, True
                return
            data = carry + chunk  # it starts at self.offset in the file
            if data.endswith(b"\n") or len(data) < self.max_line_bytes:
                carry = b""
                self.offset += len(data)
                self.line += 1
                if self.line == 1 and data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
                yield data.rstrip(b"\r\n"), True
                continue
            cut = max(data.rfind(b" "), data.rfind(b"\t"))
            if cut <= 0:
                cut = _utf8_safe_cut(data)
            data, carry = data[:cut], data[cut:]
            self.offset += cut
            yield data, False

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self.warn("invalid_utf8_lines", f"invalid UTF-8 ({err.reason} at byte {err.start}); replaced")
            return raw.decode("utf-8", errors="replace")

    def _text(self, f: io.BufferedIOBase) -> Iterator[str]:
        for raw, whole in self._lines(f):
            if not whole:
                self.stats["long_lines_split"] += 1
            if raw.strip():
                yield self._decode(raw)

    def _jsonl(self, f: io.BufferedIOBase) -> Iterator[str]:
        found = missing = 0
        in_oversized = False  # the pieces of a record too long to hold are skipped, up to its line end
        for raw, whole in self._lines(f):
            if in_oversized or not whole:
                if not in_oversized:
                    self.warn(
                        "oversized_records", f"JSON line longer than {self.max_line_bytes} bytes; skipped"
                    )
                in_oversized = not whole
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                self.warn("malformed_json_lines", f"malformed JSON ({err.msg}); skipped")
                continue
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                self.warn("records_without_text", f"no string field {self.text_field!r}; skipped")
                missing += 1
                if not found and missing >= FIELD_PROBE:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise InputError(
                        f"{self.path}: the first {FIELD_PROBE} records have no text field "
                        f"{self.text_field!r}; fields present: {keys}"
                    )
                continue
            found += 1
            if text.strip():
                yield text

    def _csv(self, f: io.BufferedIOBase, offset: int) -> Iterator[str]:
        delimiter = "\t" if self.path.name.endswith(".tsv") else ","
        # csv's field limit (128 KiB by default) is process-wide: raise it to our cap, never lower it
        csv.field_size_limit(max(csv.field_size_limit(), self.max_line_bytes))
        rows = self._csv_rows(f, delimiter)
        if offset:  # the header lives at the start of the file
            with open(self.path, "rb") as head:
                first = _FileReader(self.path, self.text_field, self.max_line_bytes, Counter())
                header = next(first._csv_rows(head, delimiter), None)
        else:
            header = next(rows, None)
        if header is None:  # an empty file
            return
        if self.text_field not in header:
            raise InputError(f"{self.path}: no column {self.text_field!r}; columns: {header}")
        column = header.index(self.text_field)
        for row in rows:
            if column < len(row) and row[column].strip():
                yield row[column]

    def _csv_rows(self, f: io.BufferedIOBase, delimiter: str) -> Iterator[list[str]]:
        """The rows of a CSV file from where `f` stands; a record csv cannot parse or longer than
        `max_line_bytes` is skipped, counted and logged with the line it starts on."""
        for raw, length, lines in _csv_records(f, delimiter.encode(), self.max_line_bytes):
            first_line = self.line + 1
            self.offset += length
            self.line += lines
            if raw is None:
                message = f"CSV record longer than {self.max_line_bytes} bytes; skipped"
                self.warn("oversized_records", message, first_line)
                continue
            if first_line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield next(csv.reader([self._decode(raw)], delimiter=delimiter), [])
            except csv.Error as err:
                self.warn("malformed_csv_records", f"malformed CSV ({err}); skipped", first_line)

    def _parquet(self, row: int) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        if self.text_field not in pf.schema_arrow.names:
            raise InputError(f"{self.path}: no column {self.text_field!r}; columns: {pf.schema_arrow.names}")
        # start at the row group holding `row`, so restoring costs one row group at most
        group, first = 0, 0
        while group < pf.num_row_groups and first + pf.metadata.row_group(group).num_rows <= row:
            first += pf.metadata.row_group(group).num_rows
            group += 1
        self.offset = first
        batches = pf.iter_batches(
            batch_size=1024, columns=[self.text_field], row_groups=range(group, pf.num_row_groups)
        )  # a small batch: an interleaved source holds one per open file
        for batch in batches:
            for text in batch.column(0).to_pylist():
                self.offset += 1
                self.line = self.offset
                if self.offset > row and isinstance(text, str) and text.strip():
                    yield text


class _SourceReader:
    """Reads one source's files, epoch after epoch, reshuffling the file order each epoch.

    The files are interleaved (`INTERLEAVED_FILES` at a time, or one at a time without
    `interleave_files`): the next document always comes from the file least far through, as a share of
    its size. The mixture then matches the corpus at every stretch of the stream, in text rather than
    in documents, and the files end together. Drawing files at random by size would not: a draw takes
    a document, and documents differ in length by 400x between files (a State of the Union address
    against a Brown corpus sentence), so the long-document files would fill the start of the stream
    and run out early. Pacing needs no random state, so the position alone resumes the stream exactly.
    """

    def __init__(
        self,
        source: Source,
        seed: int,
        shuffle: bool,
        epochs: int | None,
        max_line_bytes: int,
        stats: Counter,
    ):
        self.source, self.seed, self.shuffle, self.epochs = source, seed, shuffle, epochs
        self.max_line_bytes, self.stats = max_line_bytes, stats
        self.files = [] if source.is_hub else expand_paths(source.path)
        self.pos = _Position()
        self._hub_dataset = None  # the streaming `datasets.IterableDataset` being read

    def file_order(self, epoch: int, count: int | None = None) -> list[int]:
        """The order of this source's files (or of `count` Hub dataset shards) in `epoch`."""
        order = list(range(len(self.files) if count is None else count))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def sync(self) -> None:
        """Copy the Hub dataset's state into `self.pos` (file positions are kept current as they are read)."""
        if self._hub_dataset is not None:
            self.pos.hub_state = self._hub_dataset.state_dict()

    def documents(self) -> Iterator[str]:
        if self.source.is_hub:
            yield from self._hub_documents()
            return
        group_size = INTERLEAVED_FILES if self.source.interleave_files else 1
        while not self.pos.done:
            order = self.file_order(self.pos.epoch)
            groups = [order[i : i + group_size] for i in range(0, len(order), group_size)]
            first_pass = self.pos == _Position()
            epoch_docs = 0
            while self.pos.group < len(groups):
                for doc in self._interleaved([self.files[i] for i in groups[self.pos.group]]):
                    epoch_docs += 1
                    yield doc
                self.pos = _Position(self.pos.epoch, self.pos.group + 1)
            if epoch_docs == 0 and first_pass:
                raise InputError(
                    f"corpus source {self.source.path}: no text in any of its {len(self.files)} files"
                )
            self.pos = _Position(self.pos.epoch + 1)
            self.stats["epochs_completed"] += 1
            self.pos.done = self.epochs is not None and self.pos.epoch >= self.epochs

    def _interleaved(self, paths: list[Path]) -> Iterator[str]:
        """The documents of `paths`, each from the file least far through; ties go to the earlier file."""
        readers = [_FileReader(p, self.source.text_field, self.max_line_bytes, self.stats) for p in paths]
        sizes = [max(1, r.size()) for r in readers]
        if not self.pos.files:
            self.pos.files = [[0, 0] for _ in paths]
        heap = [(at[0] / sizes[i], i) for i, at in enumerate(self.pos.files) if at is not None]
        heapq.heapify(heap)
        open_files: dict[int, Iterator[str]] = {}
        while heap:
            _, i = heapq.heappop(heap)
            reader = readers[i]
            if i not in open_files:
                open_files[i] = reader.documents(*self.pos.files[i])
            doc = next(open_files[i], None)
            if doc is None:
                if self.pos.files[i] == [0, 0] and self.pos.epoch == 0:
                    reader.warn("empty_files", "no text in this file; skipped")
                self.pos.files[i] = None
                del open_files[i]
                continue
            self.pos.files[i] = [reader.offset, reader.line]
            heapq.heappush(heap, (reader.offset / sizes[i], i))
            yield doc

    def _hub_documents(self) -> Iterator[str]:
        import datasets

        name, config = self.source.hub_dataset
        if name.startswith((".", "/")) and not os.path.isdir(name):
            raise InputError(f"corpus source {self.source.path}: no such directory: {name}")
        while not self.pos.done:
            try:
                ds = datasets.load_dataset(name, config, split=self.source.split, streaming=True)
            except (OSError, ValueError) as err:  # not found, offline and not cached, no such config or split
                raise InputError(f"corpus source {self.source.path}: cannot stream it: {err}") from err
            if self.shuffle and ds.num_shards > 1:
                order = self.file_order(self.pos.epoch, ds.num_shards)
                ds = datasets.concatenate_datasets([ds.shard(ds.num_shards, i) for i in order])
            if self.pos.hub_state is not None:
                ds.load_state_dict(self.pos.hub_state)
            first_pass = self.pos.epoch == 0 and self.pos.hub_state is None
            self._hub_dataset = ds
            epoch_docs = 0
            for record in ds:
                if self.source.text_field not in record:
                    raise InputError(
                        f"corpus source {self.source.path}: no field {self.source.text_field!r}; "
                        f"fields: {sorted(record)}"
                    )
                text = record[self.source.text_field]
                if isinstance(text, str) and text.strip():
                    epoch_docs += 1
                    yield text
            if epoch_docs == 0 and first_pass:  # else an endless stream would reload it forever
                raise InputError(f"corpus source {self.source.path}: no text in split {self.source.split!r}")
            self._hub_dataset = None
            self.pos = _Position(self.pos.epoch + 1)
            self.stats["epochs_completed"] += 1
            self.pos.done = self.epochs is not None and self.pos.epoch >= self.epochs


class TextStream:
    """Documents from weighted sources, resumable, sharded by document across `world_size` ranks.

    `state_dict()` taken between two documents and given to `load_state_dict()` of a fresh stream with
    the same arguments makes it yield exactly the documents the first would have yielded next.
    """

    DRAW_CHUNK = 4096  # source choices drawn at once: one numpy call per chunk, not per document

    def __init__(
        self,
        sources: Sequence[str | Source | dict],
        *,
        text_field: str = "text",
        seed: int = 0,
        shuffle_files: bool = True,
        epochs: int | None = 1,
        max_line_bytes: int = 1 << 20,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.sources = as_sources(sources, text_field=text_field)
        self.seed, self.epochs, self.rank, self.world_size = seed, epochs, rank, world_size
        self.stats: Counter = Counter()
        self.readers = [
            _SourceReader(s, seed + i, shuffle_files, epochs, max_line_bytes, self.stats)
            for i, s in enumerate(self.sources)
        ]
        self.documents_read = 0  # across all ranks: the index of the next document in the global order
        self._rng = np.random.default_rng(seed)
        self._draws = np.empty(0, dtype=np.int64)
        self._iterators: dict[int, Iterator[str]] = {}

    def __iter__(self) -> Iterator[str]:
        active = [i for i, r in enumerate(self.readers) if not r.pos.done]
        while active:
            index = active[0] if len(self.readers) == 1 else self._next_source(active)
            it = self._iterators.get(index)
            if it is None:
                it = self._iterators[index] = self.readers[index].documents()
            doc = next(it, None)
            if doc is None:
                del self._iterators[index]
                active.remove(index)
                self._draws = np.empty(0, dtype=np.int64)  # weights changed: redraw
                continue
            self.documents_read += 1
            self.stats["documents"] += 1
            if (self.documents_read - 1) % self.world_size == self.rank:
                yield doc

    def _next_source(self, active: list[int]) -> int:
        while True:
            if len(self._draws) == 0:
                weights = np.array([self.sources[i].weight for i in active])
                self._draws = self._rng.choice(
                    np.array(active), size=self.DRAW_CHUNK, p=weights / weights.sum()
                )
            index, self._draws = int(self._draws[0]), self._draws[1:]
            if index in active:
                return index

    def state_dict(self) -> dict:
        for reader in self.readers:
            reader.sync()
        return {
            "positions": [copy.deepcopy(vars(r.pos)) for r in self.readers],
            "documents_read": self.documents_read,
            "rng": self._rng.bit_generator.state,
            "draws": self._draws.tolist(),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["positions"]) != len(self.readers):
            raise InputError(
                f"saved corpus state has {len(state['positions'])} sources, "
                f"this corpus has {len(self.readers)}: resume with the same --corpus"
            )
        for reader, pos in zip(self.readers, state["positions"], strict=True):
            if set(pos) != set(vars(reader.pos)):
                raise InputError(
                    "saved corpus state is from an earlier version of the reader (before files were "
                    "interleaved): it cannot resume exactly; start the run afresh"
                )
            reader.pos = _Position(**copy.deepcopy(pos))
        self.documents_read = state["documents_read"]
        self._rng.bit_generator.state = state["rng"]
        self._draws = np.array(state["draws"], dtype=np.int64)
        self.stats.clear()
        self.stats.update(state["stats"])
        self._iterators = {}


def describe(stats: Counter | dict) -> str:
    """One line for the user: documents read and whatever bad input was skipped or repaired."""
    problems = {k: v for k, v in stats.items() if k not in ("documents", "epochs_completed")}
    extra = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(problems.items()))
    return f"{stats.get('documents', 0)} documents" + (f" ({extra})" if extra else "")


# the states of csv's parser (excel dialect, not strict) that decide where a record ends
_FIELD_START, _IN_FIELD, _IN_QUOTES, _QUOTE_IN_QUOTES = range(4)
_QUOTED_TEXT = re.compile(rb'[^"]*(?:""[^"]*)*')  # inside quotes, up to the quote that may close them


def _csv_records(
    f: io.BufferedIOBase, delimiter: bytes, max_bytes: int
) -> Iterator[tuple[bytes | None, int, int]]:
    """(record, its length in bytes, its lines) for each CSV record of `f`: whole lines, several where a
    quoted field holds line ends; the record without its final line end, None where it is longer than
    `max_bytes` (then read in pieces, so memory stays bounded).

    Records are cut here rather than by csv.reader, so that one too long to hold can be skipped whole
    (csv.reader would read it into memory) and every record ends at a byte offset a reader can seek to.
    """
    while True:
        parts: list[bytes] | None = []
        length = lines = 0
        state = _FIELD_START
        while True:
            chunk = f.readline(max_bytes + 1 - length if parts is not None else max_bytes)
            if not chunk:
                break
            length += len(chunk)
            state = _csv_scan(chunk, state, delimiter)
            if parts is not None:
                parts.append(chunk)
                if length > max_bytes:
                    parts = None
            line_end = chunk.endswith(b"\n")
            lines += line_end
            if line_end and state != _IN_QUOTES:
                break
        if not length:
            return
        if not line_end:  # the file's last line, without a line end
            lines += 1
        if parts is None:
            yield None, length, lines
            continue
        record = b"".join(parts)
        # a quoted field still open at the end of the file keeps its line end, as csv.reader reads it
        yield (record if state == _IN_QUOTES else record.rstrip(b"\r\n")), length, lines


def _csv_scan(data: bytes, state: int, delimiter: bytes) -> int:
    """The parser's state after `data`, from `state`: csv's rules, a field at a time, not byte by byte.
    Line ends are not looked at: the caller ends a record at a line end outside quotes."""
    pos, end = 0, len(data)
    while pos < end:
        if state == _IN_QUOTES:
            pos = _QUOTED_TEXT.match(data, pos).end()
            if pos == end:
                return _IN_QUOTES
            pos += 1
            state = _QUOTE_IN_QUOTES
        elif state == _QUOTE_IN_QUOTES:  # a doubled quote cut between two pieces of a line
            if data[pos] == 0x22:
                pos += 1
                state = _IN_QUOTES
            else:
                state = _IN_FIELD
        elif state == _FIELD_START and data[pos] == 0x22:
            pos += 1
            state = _IN_QUOTES
        else:  # an unquoted field, or what follows a closing quote: read as it is up to the delimiter
            pos = data.find(delimiter, pos) + 1
            if not pos:
                return _IN_FIELD
            state = _FIELD_START
    return state


def _utf8_safe_cut(data: bytes) -> int:
    """The largest cut point <= len(data) that does not split a UTF-8 sequence."""
    start = len(data) - 1
    while start > 0 and (data[start] & 0xC0) == 0x80:
        start -= 1
    lead = data[start]
    width = 4 if lead >= 0xF0 else 3 if lead >= 0xE0 else 2 if lead >= 0xC0 else 1
    return start if start + width > len(data) and start > 0 else len(data)
