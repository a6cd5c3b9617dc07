"""`hf:` corpus sources, offline: a local directory laid out as a Hub dataset repository (Parquet shards
under data/, named by split) streams through `datasets` with weights, rank sharding and exact resume."""

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_trainer import pretrain, records

from mlm_pretrain.corpus import ALIASES, Source, TextStream
from mlm_pretrain.errors import InputError


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """data/train-0000{0,1,2}-of-00003.parquet (100 Austen lines each, "SHARD.ROW " before each, in row
    groups of 32) and data/validation-00000-of-00001.parquet, as a dataset repository is laid out."""
    with gzip.open(f"{ALIASES['@sample']}/austen_sample.txt.gz", "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()][:360]
    root = tmp_path_factory.mktemp("hub_dataset")
    (root / "data").mkdir()
    for shard in range(3):
        rows = [f"{shard}.{i} {line}" for i, line in enumerate(lines[shard * 100 : (shard + 1) * 100])]
        table = pa.table({"id": [f"{shard}-{i}" for i in range(100)], "text": rows})
        pq.write_table(table, root / "data" / f"train-0000{shard}-of-00003.parquet", row_group_size=32)
    pq.write_table(pa.table({"text": lines[300:]}), root / "data" / "validation-00000-of-00001.parquet")
    return root, lines[300:]


def test_a_hub_layout_directory_streams_each_split_with_shards_reordered_each_epoch(hub_dir):
    root, validation = hub_dir
    docs = list(TextStream([f"hf:{root}"], seed=3, epochs=2))
    assert docs == list(TextStream([f"hf:{root}"], seed=3, epochs=2))
    rows = [tuple(map(int, doc.split(" ", 1)[0].split("."))) for doc in docs]
    first, second = rows[:300], rows[300:]
    assert sorted(first) == sorted(second) == [(s, i) for s in range(3) for i in range(100)]
    # whole shards one after another, each in its order; the shard order is another each epoch
    order = [[shard for shard, _ in epoch[::100]] for epoch in (first, second)]
    assert [first, second] == [[(s, i) for s in shards for i in range(100)] for shards in order]
    assert order[0] != order[1]

    assert list(TextStream([f"hf:{root}@validation"])) == validation
    assert list(TextStream([{"path": f"hf:{root}", "split": "validation"}])) == validation
    with pytest.raises(InputError, match="split 'train', but the path names 'validation'"):
        Source(f"hf:{root}@validation", split="train")
    with pytest.raises(InputError, match="`split` is for Hub datasets"):
        Source(str(root / "data"), split="validation")


def test_a_hub_dataset_resumes_exactly_and_shards_by_rank(hub_dir):
    root, _ = hub_dir
    source = [f"hf:{root}"]
    docs = list(TextStream(source, seed=1, epochs=2))
    for cut in (1, 77, 100, 299, 300, 451):  # mid row group, shard and epoch boundaries
        stream = TextStream(source, seed=1, epochs=2)
        it = iter(stream)
        head = [next(it) for _ in range(cut)]
        resumed = TextStream(source, seed=1, epochs=2)
        resumed.load_state_dict(stream.state_dict())
        assert head + list(resumed) == docs, cut
    ranks = [list(TextStream(source, seed=1, epochs=2, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == docs[0::2] and ranks[1] == docs[1::2]


def test_a_hub_dataset_mixes_by_weight_with_a_local_file_and_resumes_exactly(hub_dir, tmp_path):
    root, _ = hub_dir
    (tmp_path / "local.txt").write_text("\n".join(f"local {i}" for i in range(200)) + "\n")
    sources = [{"path": f"hf:{root}", "weight": 3.0}, {"path": str(tmp_path / "local.txt")}]
    docs = list(TextStream(sources, seed=5))
    assert 120 < sum(not d.startswith("local ") for d in docs[:200]) < 180  # about 3 Hub documents to 1

    stream = TextStream(sources, seed=5, epochs=None)  # endless, resumable at any point
    it = iter(stream)
    [next(it) for _ in range(523)]
    resumed = TextStream(sources, seed=5, epochs=None)
    resumed.load_state_dict(stream.state_dict())
    assert [next(it) for _ in range(400)] == [d for _, d in zip(range(400), resumed, strict=False)]


def test_bad_hub_sources_name_the_source(hub_dir, tmp_path):
    root, _ = hub_dir
    with pytest.raises(InputError, match=r"hf:\./no-such-dir: no such directory"):
        list(TextStream(["hf:./no-such-dir"]))
    with pytest.raises(InputError, match=rf"hf:{root}@test: cannot stream it: .*test"):
        list(TextStream([f"hf:{root}@test"]))
    with pytest.raises(InputError, match=rf"hf:{root}: no field 'body'; fields: \['id', 'text'\]"):
        list(TextStream([f"hf:{root}"], text_field="body"))


@pytest.mark.slow
def test_pretraining_reads_corpus_and_validation_from_a_hub_layout_directory(hub_dir, tmp_path):
    root, _ = hub_dir
    pretrain(tmp_path, "--corpus", f"hf:{root}", "--validation", f"hf:{root}@validation", "--max-steps", "2")
    assert [step for step, _ in records(tmp_path, "loss")] == [1, 2]
    assert records(tmp_path, "eval_loss")
    card = (tmp_path / "final" / "README.md").read_text()
    assert f"hf:{root.name}" in card and str(root) not in card  # no local path in what is published
