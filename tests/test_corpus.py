import gzip
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_pretrain import corpus as corpus_module
from mlm_pretrain.corpus import ALIASES, TextStream, as_sources, expand_paths
from mlm_pretrain.errors import InputError

SAMPLE = ALIASES["@sample"]


def lines_of(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


@pytest.fixture(scope="module")
def austen_lines():
    return lines_of(f"{SAMPLE}/austen_sample.txt.gz")[:300]


def write_formats(tmp_path, lines):
    """The same documents in every supported format."""
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    records = "\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(lines)) + "\n"
    (tmp_path / "a.jsonl").write_text(records, encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(records)
    pq.write_table(
        pa.table({"id": list(range(len(lines))), "body": lines}), tmp_path / "a.parquet", row_group_size=64
    )
    import csv

    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body"])
        writer.writerows(enumerate(lines))


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz", "a.jsonl", "a.jsonl.gz", "a.parquet", "a.csv"])
def test_every_format_yields_the_same_documents_and_resumes_exactly(tmp_path, austen_lines, name):
    write_formats(tmp_path, austen_lines)
    field = "text" if name.startswith("a.txt") else "body"
    docs = list(TextStream([str(tmp_path / name)], text_field=field))
    assert docs == austen_lines
    for cut in (1, 77, 200):
        stream = TextStream([str(tmp_path / name)], text_field=field)
        it = iter(stream)
        head = [next(it) for _ in range(cut)]
        resumed = TextStream([str(tmp_path / name)], text_field=field)
        resumed.load_state_dict(stream.state_dict())
        assert head + list(resumed) == austen_lines


def test_directories_globs_and_missing_paths(tmp_path, austen_lines):
    write_formats(tmp_path, austen_lines)
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert [p.name for p in expand_paths(str(tmp_path / "*.txt*"))] == ["a.txt", "a.txt.gz"]
    assert len(expand_paths(str(tmp_path))) == 6
    with pytest.raises(InputError, match="not found: .*nope.txt"):
        expand_paths(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="matches no file"):
        expand_paths(str(tmp_path / "*.xml"))
    with pytest.raises(InputError, match="unsupported corpus file type"):
        expand_paths(str(tmp_path / "notes.md"))
    with pytest.raises(InputError, match="2 corpus weights given for 1"):
        as_sources(["x"], weights=[1, 2])


def test_bad_input_is_skipped_and_counted_or_stops_with_the_file_named(tmp_path, caplog):
    good = json.dumps({"text": "a fine record"})
    lines = [good, "{not json", json.dumps({"title": "no text here"}), json.dumps({"text": 5}), good]
    (tmp_path / "mixed.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    stream = TextStream([str(tmp_path / "mixed.jsonl")])
    with caplog.at_level(logging.WARNING):
        assert list(stream) == ["a fine record", "a fine record"]
    assert stream.stats["malformed_json_lines"] == 1
    assert stream.stats["records_without_text"] == 2
    assert "mixed.jsonl:2: malformed JSON" in caplog.text

    (tmp_path / "nofield.jsonl").write_text("\n".join([json.dumps({"title": "x"})] * 120) + "\n")
    with pytest.raises(
        InputError, match=r"nofield.jsonl: .* no text field 'text'; fields present: \['title'\]"
    ):
        list(TextStream([str(tmp_path / "nofield.jsonl")]))

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\r\nsecond line\r\n".encode("latin-1"))
    stream = TextStream([str(tmp_path / "latin1.txt")])
    assert list(stream) == ["caf\ufffd au lait", "second line"]
    assert stream.stats["invalid_utf8_lines"] == 1

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "empty.txt").write_text("")
    (tmp_path / "dir" / "latin1.txt").write_bytes((tmp_path / "latin1.txt").read_bytes())
    stream = TextStream([str(tmp_path / "dir")])
    assert len(list(stream)) == 2 and stream.stats["empty_files"] == 1
    with pytest.raises(InputError, match="no text in any of its 1 files"):
        list(TextStream([str(tmp_path / "dir" / "empty.txt")]))


def test_truncated_gzip_names_the_file_and_line(tmp_path, austen_lines):
    data = gzip.compress(("\n".join(austen_lines * 5) + "\n").encode())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.txt.gz: truncated or corrupt gzip data after line \d+"):
        list(TextStream([str(tmp_path / "cut.txt.gz")]))


def test_a_huge_line_is_split_with_bounded_memory_and_resumes_exactly(tmp_path):
    words = [f"w{i % 9973}é" for i in range(400_000)]  # ~3 MB on one line, multi-byte characters
    (tmp_path / "one_line.txt").write_text(" ".join(words) + "\nnext line\n", encoding="utf-8")
    stream = TextStream([str(tmp_path / "one_line.txt")], max_line_bytes=100_000)
    docs = list(stream)
    assert max(len(d.encode()) for d in docs) <= 100_000
    assert " ".join(docs[:-1]).split() == words and docs[-1] == "next line"
    assert stream.stats["long_lines_split"] == len(docs) - 2
    first = TextStream([str(tmp_path / "one_line.txt")], max_line_bytes=100_000)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    resumed = TextStream([str(tmp_path / "one_line.txt")], max_line_bytes=100_000)
    resumed.load_state_dict(first.state_dict())
    assert head + list(resumed) == docs

    (tmp_path / "huge.jsonl").write_text(
        json.dumps({"text": " ".join(words)}) + "\n" + json.dumps({"text": "kept"}) + "\n"
    )
    stream = TextStream([str(tmp_path / "huge.jsonl")], max_line_bytes=100_000)
    assert list(stream) == ["kept"] and stream.stats["oversized_records"] == 1


def test_weighted_interleaving_epochs_and_rank_sharding_are_deterministic(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"a{i}" for i in range(300)) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"b{i}" for i in range(100)) + "\n")
    sources = [{"path": str(tmp_path / "a.txt"), "weight": 3.0}, {"path": str(tmp_path / "b.txt")}]
    docs = list(TextStream(sources, seed=5, epochs=2))
    assert docs == list(TextStream(sources, seed=5, epochs=2))
    assert sorted(docs) == sorted([f"a{i}" for i in range(300)] * 2 + [f"b{i}" for i in range(100)] * 2)
    first_half = docs[:200]  # both sources are live: about 3 a's for every b
    assert 120 < sum(d.startswith("a") for d in first_half) < 180
    ranks = [list(TextStream(sources, seed=5, epochs=2, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == docs[0::2] and ranks[1] == docs[1::2]

    stream = TextStream(sources, seed=5, epochs=None)  # endless, resumable at any point
    it = iter(stream)
    [next(it) for _ in range(1234)]
    resumed = TextStream(sources, seed=5, epochs=None)
    resumed.load_state_dict(stream.state_dict())
    assert [next(it) for _ in range(500)] == [d for _, d in zip(range(500), resumed, strict=False)]


def test_file_order_is_reshuffled_every_epoch_with_the_seed(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"file {i}\n")
    docs = list(TextStream([str(tmp_path)], seed=1, epochs=3))
    epochs = [docs[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert docs != list(TextStream([str(tmp_path)], seed=2, epochs=3))


def write_three_domains(directory):
    """Three files of different sizes, formats and document lengths; a document names its file."""
    directory.mkdir()
    (directory / "a.txt").write_text("".join(f"a{i} short line\n" for i in range(600)))
    with gzip.open(directory / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": f"b{i} " + "long " * 200}) + "\n" for i in range(40))
    pq.write_table(pa.table({"text": [f"c{i} " + "mid " * 20 for i in range(150)]}), directory / "c.parquet")
    return str(directory)


def test_the_files_of_a_directory_are_mixed_from_the_start_in_proportion_to_their_text(tmp_path):
    corpus = write_three_domains(tmp_path / "corpus")
    docs = list(TextStream([corpus], seed=0))
    assert sorted(d[0] for d in docs) == ["a"] * 600 + ["b"] * 40 + ["c"] * 150
    assert {d[0] for d in docs[:30]} == {"a", "b", "c"}  # read one file after another: 30 a's
    totals = Counter()
    for d in docs:
        totals[d[0]] += len(d)
    share = {k: v / sum(totals.values()) for k, v in totals.items()}
    for end in (len(docs) // 4, len(docs) // 2):  # every stretch holds the corpus' mixture, in text
        read = Counter()
        for d in docs[:end]:
            read[d[0]] += len(d)
        assert all(abs(read[k] / sum(read.values()) - share[k]) < 0.05 for k in share)
    assert {d[0] for d in docs[-len(docs) // 20 :]} == {"a", "b", "c"}  # and the files end together

    assert docs == list(TextStream([corpus], seed=0))
    epochs = list(TextStream([corpus], seed=0, epochs=3))
    assert sorted(epochs) == sorted(docs * 3) and epochs[: len(docs)] == docs
    assert epochs != list(TextStream([corpus], seed=1, epochs=3))  # the seed orders the files


def test_an_interleaved_directory_resumes_exactly_and_shards_by_rank(tmp_path):
    corpus = write_three_domains(tmp_path / "corpus")
    straight = list(TextStream([corpus], seed=4, epochs=2))
    for cut in (1, 2, 3, 57, 400, len(straight) // 2 - 1, len(straight) // 2, len(straight) - 1):
        stream = TextStream([corpus], seed=4, epochs=2)
        it = iter(stream)
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint stores it
        resumed = TextStream([corpus], seed=4, epochs=2)
        resumed.load_state_dict(state)
        assert head + list(resumed) == straight, cut
        assert list(it) == straight[cut:]  # and saving left the stream as it was

    ranks = [list(TextStream([corpus], seed=4, epochs=2, rank=r, world_size=3)) for r in range(3)]
    assert [ranks[r] == straight[r::3] for r in range(3)] == [True] * 3


def test_interleaving_can_be_turned_off_and_is_bounded_to_groups_of_files(tmp_path, monkeypatch):
    corpus = write_three_domains(tmp_path / "corpus")
    docs = list(TextStream([{"path": corpus, "interleave_files": False}], shuffle_files=False))
    assert "".join(d[0] for d in docs) == "a" * 600 + "b" * 40 + "c" * 150

    monkeypatch.setattr(corpus_module, "INTERLEAVED_FILES", 2)
    docs = list(TextStream([corpus], shuffle_files=False))
    mixed, rest = docs[:640], docs[640:]
    assert {d[0] for d in mixed[:30]} == {"a", "b"}
    assert sorted(d[0] for d in mixed) == ["a"] * 600 + ["b"] * 40
    assert {d[0] for d in rest} == {"c"}
    with pytest.raises(InputError, match="unknown: interleave"):
        as_sources([{"path": corpus, "interleave": False}])


def write_csv(path, rows, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "body", "label"])
        writer.writerows(rows)


def test_csv_fields_over_128_kib_and_across_lines_are_read_whole_and_resume_exactly(tmp_path):
    # csv's own field limit is 128 KiB; a record under max_line_bytes is read whatever its fields hold
    bodies = [f"row {i} " + ("long " * 60_000 if i == 200 else "short") for i in range(400)]
    bodies[7] = 'a "quoted" word, a comma\nand a second line'
    write_csv(tmp_path / "big.csv", [(i, body, "x") for i, body in enumerate(bodies)])
    assert len(bodies[200]) > 300_000
    stream = TextStream([str(tmp_path / "big.csv")], text_field="body")
    assert list(stream) == bodies and not set(stream.stats) - {"documents", "epochs_completed"}
    for cut in (7, 8, 199, 200, 201):
        first = TextStream([str(tmp_path / "big.csv")], text_field="body")
        it = iter(first)
        head = [next(it) for _ in range(cut)]
        resumed = TextStream([str(tmp_path / "big.csv")], text_field="body")
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + list(resumed) == bodies, cut


def test_a_csv_record_over_the_byte_cap_is_skipped_whole_and_named(tmp_path, caplog):
    bodies = [f"row {i}" for i in range(50)]
    bodies[20] = "huge " * 60_000  # 300 KB, three times the cap: its columns must not spill into rows
    write_csv(tmp_path / "t.tsv", [(i, body, "x") for i, body in enumerate(bodies)], delimiter="\t")
    with open(tmp_path / "t.tsv", "a", encoding="utf-8") as f:
        f.write('50\t"an unclosed quote\there\tx\n51\tlast\tx\n')  # runs to the end of the file: one record
    stream = TextStream([str(tmp_path / "t.tsv")], text_field="body", max_line_bytes=100_000)
    with caplog.at_level(logging.WARNING):
        docs = list(stream)
    assert docs == bodies[:20] + bodies[21:] + ["an unclosed quote\there\tx\n51\tlast\tx\n"]
    assert stream.stats["oversized_records"] == 1
    assert "t.tsv:22: CSV record longer than 100000 bytes; skipped" in caplog.text

    (tmp_path / "bad.csv").write_text("id,body\n1,good\n2,bad\rline\n3,fine\n")
    stream = TextStream([str(tmp_path / "bad.csv")], text_field="body")
    with caplog.at_level(logging.WARNING):
        assert list(stream) == ["good", "fine"]
    assert stream.stats["malformed_csv_records"] == 1 and "bad.csv:3: malformed CSV" in caplog.text
