"""Fine-tuning: tasks, offline metrics, batching, the loop, the baseline, result files and the CLI.

The checkpoint is built here (a tiny WordPiece tokenizer and a 2-layer BERT of hidden 32), since the
pretraining command's output is not a fixture of these tests.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlm_pretrain import cli
from mlm_pretrain.errors import InputError
from mlm_pretrain.finetune import FinetuneConfig, finetune, load_task, tfidf_baseline
from mlm_pretrain.finetune.batching import encode, length_grouped_batches, padding_fraction
from mlm_pretrain.finetune.results import PRETRAINED_CARD
from mlm_pretrain.finetune.scoring import METRICS_DIR

DATA = Path(__file__).parent / "data" / "tasks"
SHIPPED_RT = Path(__file__).parents[1] / "mlm_pretrain" / "data" / "tasks" / "rt_sentiment"
TINY = FinetuneConfig(epochs=2, lrs=(1e-3,), batch_size=16, max_length=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import build_tiny_checkpoint

    rt_rows = (DATA / "rt_sentiment" / "train.jsonl").read_text().splitlines()
    stsb_rows = (DATA / "stsb" / "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in rt_rows]
    texts += [json.loads(line)[key] for line in stsb_rows for key in ("sentence1", "sentence2")]
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bert"), texts, vocab_size=800)


def test_local_task_directory_loads_with_sensible_metrics():
    rt = load_task(str(DATA / "rt_sentiment"))
    assert (len(rt.train), len(rt.validation), len(rt.scored["test"])) == (300, 100, 100)
    assert rt.metrics == ("accuracy",) and rt.label_names == ["0", "1"] and not rt.is_pair

    stsb = load_task(str(DATA / "stsb"))
    assert stsb.is_regression and stsb.is_pair and stsb.metrics == ("pearsonr", "spearmanr")

    trec = load_task(str(DATA / "trec"))  # string labels, no validation file: a slice of train held out
    assert trec.num_labels == len(set(trec.label_names)) >= 5
    assert (len(trec.train), len(trec.validation)) == (180, 20)
    assert trec.notes and "held out" in trec.notes[0]


def test_imbalanced_binary_task_is_scored_by_f1(tmp_path):
    rows = [{"text": f"message {i}", "label": int(i % 10 == 0)} for i in range(100)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:20]))
    assert load_task(str(tmp_path)).metrics == ("f1",)
    assert load_task(str(tmp_path), metric="accuracy").metrics == ("accuracy",)


def test_tasks_given_as_csv_files_with_named_fields(tmp_path):
    lines = ["question,answer,score"] + [f"q{i},a{i},{i % 3}" for i in range(30)]
    (tmp_path / "all.csv").write_text("\n".join(lines) + "\n")
    task = load_task(
        "qa",
        train=str(tmp_path / "all.csv"),
        test=str(tmp_path / "all.csv"),
        text_fields=("question", "answer"),
        label_field="score",
    )
    assert task.is_pair and task.label_names == ["0", "1", "2"] and task.train.pair_texts[0] == "a0"


def test_bad_task_path_and_missing_label_field_name_the_culprit(tmp_path):
    with pytest.raises(InputError, match="no_such_task"):
        load_task(str(tmp_path / "no_such_task"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "no label here"}\n')
    (bad / "test.jsonl").write_text('{"text": "fine", "label": 1}\n')
    with pytest.raises(InputError, match=r"train\.jsonl:2: missing field 'label'"):
        load_task(str(bad))
    with pytest.raises(InputError, match=r"missing field 'stars'"):
        load_task(str(bad), label_field="stars")


@pytest.mark.slow
def test_metrics_load_offline_in_a_fresh_process():
    code = (
        "import evaluate, sys\n"
        "for name in ['accuracy', 'f1', 'matthews_correlation', 'pearsonr', 'spearmanr']:\n"
        "    m = evaluate.load(sys.argv[1] + '/' + name)\n"
        "    print(name, list(m.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]).values())[0])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(METRICS_DIR)], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    values = dict(zip(out[::2], map(float, out[1::2]), strict=True))
    assert values["accuracy"] == pytest.approx(0.75)
    assert values["f1"] == pytest.approx(2 / 3)
    assert values["matthews_correlation"] == pytest.approx(0.57735, abs=1e-4)
    assert values["pearsonr"] == pytest.approx(0.57735, abs=1e-4)


def test_length_grouped_batches_pad_less_than_random_batches(model_dir):
    from transformers import AutoTokenizer

    task = load_task(str(DATA / "rt_sentiment"))
    lengths = [
        len(ex["input_ids"]) for ex in encode(AutoTokenizer.from_pretrained(model_dir), task.train, 128)
    ]
    rng = random.Random(0)
    grouped = length_grouped_batches(lengths, 16, rng)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    shuffled = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert sorted(i for batch in grouped for i in batch) == list(range(len(lengths)))  # every example once
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(shuffled, lengths)
    assert grouped != length_grouped_batches(lengths, 16, rng)  # reshuffled every epoch


def test_baseline_is_well_above_chance_on_rt_sentiment():
    result = tfidf_baseline(str(SHIPPED_RT))  # 2000 train rows shipped with the package
    assert result["scores"]["test"]["accuracy"] > 0.65


def test_classification_end_to_end_writes_tables_and_model_card(model_dir, tmp_path):
    result = finetune(model_dir, str(DATA / "rt_sentiment"), tmp_path / "out", seeds=2, config=TINY)
    assert [run["seed"] for run in result["seeds"]] == [0, 1]
    scores = [run["scores"]["test"]["accuracy"] for run in result["seeds"]]
    assert all(0.0 <= s <= 1.0 for s in scores) and result["median"]["test"] == pytest.approx(sum(scores) / 2)
    assert result["baseline"]["scores"]["test"]["accuracy"] > 0.5
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["median"] == result["median"] and saved["init"] == "pretrained"
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| rt_sentiment | test | accuracy |" in table and "TF-IDF baseline" in table

    card = (tmp_path / "out" / PRETRAINED_CARD).read_text()  # the checkpoint's card, with the results
    assert card.count("## Fine-tuning results") == 1 and "| rt_sentiment | test | accuracy |" in card
    (model_dir / "README.md").write_text(card + "\n## Licence\n\nApache-2.0\n")  # as a user copies it back
    finetune(model_dir, str(DATA / "rt_sentiment"), tmp_path / "again", seeds=1, config=TINY, baseline=False)
    card = (tmp_path / "again" / PRETRAINED_CARD).read_text()  # the row replaced, one section, the rest kept
    assert card.count("| rt_sentiment |") == 1 and card.count("## Fine-tuning results") == 1
    assert card.rstrip().endswith("Apache-2.0")


def checksums(directory: Path) -> dict[str, str]:
    import hashlib

    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_finetune_never_writes_inside_the_model_directory(tiny_checkpoint, tmp_path, monkeypatch):
    # laid out like a Hugging Face cache snapshot: the files are symlinks into a shared blob store
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(tiny_checkpoint, blobs)
    (blobs / "README.md").write_text("# tiny\n\nA card someone wrote.\n")
    snapshot.mkdir()
    for blob in blobs.iterdir():
        (snapshot / blob.name).symlink_to(blob)
    before = checksums(blobs), checksums(snapshot), sorted(p.name for p in snapshot.iterdir())
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["finetune"])
    argv = ["finetune", "--model", str(snapshot), "--task", str(DATA / "trec"), "--out", str(tmp_path)]
    argv += ["--seeds", "1", "--epochs", "1", "--max-length", "16", "--no-baseline"]
    assert cli.main(argv) == 0
    assert (checksums(blobs), checksums(snapshot), sorted(p.name for p in snapshot.iterdir())) == before
    card = (tmp_path / PRETRAINED_CARD).read_text()
    assert card.startswith("# tiny\n\nA card someone wrote.\n") and "| trec | test | accuracy |" in card


def test_regression_end_to_end_from_scratch_leaves_card_alone(model_dir, tmp_path):
    card = model_dir / "README.md"
    before = card.read_text() if card.exists() else None
    result = finetune(model_dir, str(DATA / "stsb"), tmp_path, seeds=1, config=TINY, from_scratch=True)
    test = result["seeds"][0]["scores"]["test"]
    assert set(test) == {"pearsonr", "spearmanr", "score", "loss"} and result["init"] == "random"
    assert result["baseline"]["scores"]["test"]["pearsonr"] > 0.3  # bag-of-words overlap predicts similarity
    assert "mean of pearsonr/spearmanr" in (tmp_path / "results.md").read_text()
    assert (card.read_text() if card.exists() else None) == before
    assert not (tmp_path / PRETRAINED_CARD).exists()  # its scores are not the checkpoint's


def test_early_stopping_stops_and_restores_the_best_epoch(model_dir):
    # With lr 0 the validation score never changes, so it never improves after the first epoch.
    config = FinetuneConfig(epochs=8, lrs=(0.0,), warmup=0.0, batch_size=32, patience=2)
    run = finetune(
        model_dir, str(DATA / "rt_sentiment"), seeds=1, config=config, baseline=False, from_scratch=True
    )["seeds"][0]
    assert (run["epochs_run"], run["best_epoch"]) == (3, 1)
    assert len({epoch["validation"]["score"] for epoch in run["history"]}) == 1


def keyword_task(directory: Path) -> str:
    """Sentences of random Austen words, label 1 iff "excellent" is among them, balanced: a task any
    working classifier learns from a few hundred examples."""
    text = (DATA.parent / "austen_8k.txt").read_text(encoding="utf-8").lower()
    words = sorted({word for word in re.findall(r"[a-z]+", text) if "excellen" not in word})
    rng = random.Random(1)
    directory.mkdir()
    for split, rows in (("train", 300), ("validation", 100), ("test", 100)):
        lines = []
        for i in range(rows):
            sentence = rng.choices(words, k=rng.randint(4, 9))
            if i % 2:
                sentence.insert(rng.randint(0, len(sentence)), "excellent")
            lines.append(json.dumps({"text": " ".join(sentence), "label": i % 2}) + "\n")
        rng.shuffle(lines)
        (directory / f"{split}.jsonl").write_text("".join(lines))
    return str(directory)


@pytest.mark.slow
def test_fine_tuning_learns_a_keyword_task_at_the_learning_rate_validation_picks(tiny_checkpoint, tmp_path):
    # A tiny model's validation score sits at the majority class for its first epochs while the loss
    # falls: stopping on the score alone ended one of these three runs there, at 0.5.
    config = FinetuneConfig(epochs=8, lrs=(1e-5, 1e-3), batch_size=16, max_length=32)
    task = keyword_task(tmp_path / "task")
    result = finetune(tiny_checkpoint, task, tmp_path / "out", seeds=3, config=config)
    assert [entry["lr"] for entry in result["grid"]] == [1e-5, 1e-3] and result["lr"] == 1e-3
    assert result["grid"][0]["validation_median"] < 0.6 and result["grid"][1]["validation_median"] > 0.9
    scores = [run["scores"]["test"]["accuracy"] for run in result["seeds"]]
    assert min(scores) >= 0.9, scores  # the majority class scores 0.5
    assert all(run["lr"] == 1e-3 for run in result["seeds"])
    assert (
        "lr 0.001, chosen by median validation score from 1e-05 (0.5"
        in (tmp_path / "out" / "results.md").read_text()
    )


def test_cli_runs_a_task_and_reports_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["finetune"])  # the other commands are not under test here
    argv = [
        "finetune",
        "--model",
        str(model_dir),
        "--task",
        str(DATA / "trec"),
        "--out",
        str(tmp_path),
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--lr",
        "1e-4",
        "1e-3",
        "--max-length",
        "32",
        "--no-baseline",
        "--from-scratch",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| trec | test | accuracy |" in out and "chosen by median validation score from 0.0001" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["max_length"] == 32 and [entry["lr"] for entry in saved["grid"]] == [1e-4, 1e-3]

    assert (
        cli.main(
            ["finetune", "--model", str(model_dir), "--task", str(DATA / "trec"), "--label-field", "stars"]
        )
        == 2
    )
    assert "missing field 'stars'" in capsys.readouterr().err


def test_the_best_seed_is_saved_for_the_text_classification_pipeline_with_plot_and_card(
    tiny_checkpoint, tmp_path
):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    task_dir = Path(keyword_task(tmp_path / "task"))
    for split in ("train", "validation", "test"):  # class names, for the pipeline to print
        rows = [json.loads(line) for line in (task_dir / f"{split}.jsonl").read_text().splitlines()]
        lines = [json.dumps({**row, "label": ["dull", "excellent"][row["label"]]}) + "\n" for row in rows]
        (task_dir / f"{split}.jsonl").write_text("".join(lines))
    config = FinetuneConfig(epochs=2, lrs=(1e-3,), batch_size=16, max_length=32)
    out = tmp_path / "out"
    result = finetune(model_dir, str(task_dir), out, seeds=2, config=config, random_init=True)

    saved = out / "model"
    assert result["saved_model"] == {"path": str(saved), "seed": result["saved_model"]["seed"]}
    # the best validation score, the lower validation loss breaking ties (max keeps the first of equals)
    run = max(
        result["seeds"],
        key=lambda run: (
            run["validation_score"],
            -run["history"][run["best_epoch"] - 1]["validation"]["loss"],
        ),
    )
    assert result["saved_model"]["seed"] == run["seed"]
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.bin"))

    test = [json.loads(line) for line in (task_dir / "test.jsonl").read_text().splitlines()]
    classifier = pipeline("text-classification", model=str(saved))
    predicted = classifier([row["text"] for row in test], truncation=True)
    assert {p["label"] for p in predicted} <= {"dull", "excellent"}
    accuracy = sum(p["label"] == row["label"] for p, row in zip(predicted, test, strict=True)) / len(test)
    assert accuracy == pytest.approx(run["scores"]["test"]["accuracy"])  # these are the saved seed's weights

    for png in (out / "results.png", saved / "results.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert result["random_init"]["lr"] == 1e-3 and len(result["random_init"]["seeds"]) == 2
    table = (out / "results.md").read_text()
    assert "random init (median)" in table and "![scores per seed](results.png)" in table
    assert f"seed {run['seed']} (the best of these on validation)" in table

    card = ModelCard.load(saved / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    (scored,) = card.data.eval_results
    assert (scored.dataset_name, scored.dataset_split, scored.metric_type) == ("task", "test", "accuracy")
    assert scored.metric_value == round(run["scores"]["test"]["accuracy"], 4)


def test_random_init_beside_from_scratch_is_refused(model_dir):
    with pytest.raises(InputError, match="from_scratch"):
        finetune(model_dir, str(DATA / "trec"), seeds=1, config=TINY, from_scratch=True, random_init=True)


def write_glue_copy(root: Path, hidden_validation: bool = False) -> Path:
    """A few rows of sst2, mrpc, stsb and mnli in the layout of the Hub's nyu-mll/glue: one Parquet file
    per split, `<task>/<split>-00000-of-00001.parquet`, test labels hidden as -1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ["good", "bad", "fine", "dull", "great", "awful"]
    tasks = {  # text fields, label of row i, the dev splits
        "sst2": (("sentence",), lambda i: i % 2, ("validation",)),
        "mrpc": (("sentence1", "sentence2"), lambda i: int(i % 3 == 0), ("validation",)),
        "stsb": (("sentence1", "sentence2"), lambda i: i % 6 * 1.0, ("validation",)),
        "mnli": (("premise", "hypothesis"), lambda i: i % 3, ("validation_matched", "validation_mismatched")),
    }
    for task, (fields, label, dev_splits) in tasks.items():
        hidden = -1.0 if task == "stsb" else -1
        sizes = {
            "train": (30, False),
            "test": (5, True),
            **{split: (12, hidden_validation) for split in dev_splits},
        }
        (root / task).mkdir(parents=True)
        for number, (split, (n, hide)) in enumerate(sizes.items()):
            table = {
                name: [f"{words[(i + k) % 6]} {name} {100 * number + i}" for i in range(n)]
                for k, name in enumerate(fields)
            }
            table |= {"label": [hidden if hide else label(i) for i in range(n)], "idx": list(range(n))}
            pq.write_table(pa.table(table), root / task / f"{split}-00000-of-00001.parquet")
    return root


def test_glue_tasks_by_name_read_a_local_copy_of_the_hub_layout(tmp_path, monkeypatch):
    root = write_glue_copy(tmp_path / "glue")
    monkeypatch.setenv("MLM_PRETRAIN_GLUE_DIR", str(root))

    sst2 = load_task("sst2")
    assert sst2.source == str(root / "sst2") and not sst2.is_pair
    assert sst2.label_names == ["negative", "positive"] and sst2.metrics == ("accuracy",)
    assert (len(sst2.train), len(sst2.validation), list(sst2.scored)) == (27, 3, ["validation"])
    assert len(sst2.scored["validation"]) == 12  # the dev set is scored; test (labels hidden) is never read
    assert any("test labels are hidden" in note for note in sst2.notes)

    mrpc = load_task("MRPC")
    assert mrpc.is_pair and mrpc.metrics == ("f1", "accuracy") and mrpc.num_labels == 2
    assert mrpc.scored["validation"].pair_texts[0] == "bad sentence2 200"  # the third file written
    stsb = load_task("stsb")
    assert stsb.is_regression and stsb.metrics == ("pearsonr", "spearmanr")
    assert stsb.scored["validation"].labels[:3] == [0.0, 1.0, 2.0]
    mnli = load_task("mnli", metric="f1")
    assert list(mnli.scored) == ["validation_matched", "validation_mismatched"] and mnli.metrics == ("f1",)
    assert mnli.label_names == ["entailment", "neutral", "contradiction"]


def test_a_glue_copy_with_hidden_labels_or_a_missing_split_is_refused(tmp_path, monkeypatch):
    root = write_glue_copy(tmp_path / "glue", hidden_validation=True)
    monkeypatch.setenv("MLM_PRETRAIN_GLUE_DIR", str(root))
    with pytest.raises(
        InputError, match=r"split validation: label -1 on 12 of 12 rows \(GLUE hides its test"
    ):
        load_task("sst2")
    with pytest.raises(InputError, match=r"MLM_PRETRAIN_GLUE_DIR=.*: no cola/train-\*\.parquet"):
        load_task("cola")
    (root / "rte").mkdir()
    monkeypatch.setenv("MLM_PRETRAIN_GLUE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="MLM_PRETRAIN_GLUE_DIR=.*nowhere: no such directory"):
        load_task("rte")


def test_the_cli_fine_tunes_on_a_glue_copy_and_reports_the_official_metrics(
    model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["finetune"])
    monkeypatch.setenv("MLM_PRETRAIN_GLUE_DIR", str(write_glue_copy(tmp_path / "glue")))
    argv = ["finetune", "--model", str(model_dir), "--task", "mrpc", "--out", str(tmp_path / "out")]
    assert cli.main([*argv, "--seeds", "1", "--epochs", "1", "--max-length", "16", "--no-baseline"]) == 0
    assert "| mrpc | validation | mean of f1/accuracy |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == ["f1", "accuracy"] and saved["source"] == str(tmp_path / "glue" / "mrpc")
    (scores,) = [run["scores"] for run in saved["seeds"]]
    assert list(scores) == ["validation"] and {"f1", "accuracy", "score"} <= set(scores["validation"])


def test_mean_pooling_learns_and_is_saved_in_the_config_a_plain_load_uses(tmp_path):
    from conftest import build_tiny_checkpoint
    from transformers import AutoModelForSequenceClassification

    from mlm_pretrain.models import build_model
    from mlm_pretrain.schema import ModelRecipe
    from mlm_pretrain.tokenizer import load_tokenizer

    model_dir = build_tiny_checkpoint(tmp_path / "modernbert")  # its tokenizer; the BERT is replaced
    tokenizer = load_tokenizer(model_dir)
    recipe = ModelRecipe(type="modernbert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    build_model(recipe, tokenizer, 128).save_pretrained(model_dir)
    config = FinetuneConfig(epochs=3, lrs=(1e-3,), batch_size=16, max_length=32, pooling="mean")
    out = tmp_path / "out"
    result = finetune(model_dir, keyword_task(tmp_path / "task"), out, seeds=1, config=config, baseline=False)

    assert result["median"]["test"] > 0.9
    loaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert loaded.config.classifier_pooling == "mean"


def test_mean_pooling_of_a_model_without_it_is_refused_naming_the_model(model_dir):
    config = FinetuneConfig(epochs=1, lrs=(1e-3,), pooling="mean")
    with pytest.raises(InputError, match=f"{re.escape(str(model_dir))}: pooling 'mean' needs"):
        finetune(model_dir, str(DATA / "trec"), seeds=1, config=config)


@pytest.mark.parametrize(
    ("ours", "scratch", "verdict"),
    [
        (
            [0.71, 0.72, 0.74],
            [0.68, 0.70, 0.705],
            "every pretrained seed scores above every random-init seed: beyond",
        ),
        (
            [0.70, 0.72, 0.74],
            [0.68, 0.70, 0.71],
            "the two sides' seeds overlap: within the seed spread, not a sure",
        ),
        (
            [0.60, 0.62, 0.63],
            [0.68, 0.70, 0.71],
            "every random-init seed scores above every pretrained seed: pretra",
        ),
    ],
)
def test_the_gain_over_random_init_says_whether_it_is_beyond_the_seed_spread(ours, scratch, verdict):
    import statistics

    from mlm_pretrain.finetune.results import gain_over_random_init

    def side(scores: list[float]) -> dict:
        seeds = [{"scores": {"test": {"score": score}}} for score in scores]
        return {"seeds": seeds, "median": {"test": statistics.median(scores)}}

    reading = gain_over_random_init({**side(ours), "random_init": side(scratch)}, "test")
    gain = 100 * (statistics.median(ours) - statistics.median(scratch))
    ranges = f"({min(ours):.4f}-{max(ours):.4f} against {min(scratch):.4f}-{max(scratch):.4f})"
    assert reading.startswith(f"pretraining {gain:+.1f} points at the median {ranges}; {verdict}")


def test_layer_decay_gives_each_layer_its_fraction_of_the_scheduled_rate(tiny_checkpoint):
    from mlm_pretrain.finetune.train import build_classifier, layer_decay_scale
    from mlm_pretrain.optim import build_optimizer, set_lr

    model = build_classifier(tiny_checkpoint, load_task(str(DATA / "rt_sentiment")))
    optimizer = build_optimizer(model, 1e-3, lr_scale=layer_decay_scale(model.config.num_hidden_layers, 0.5))
    set_lr(optimizer, 1e-3)
    rate = {id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
    named = dict(model.named_parameters())
    # 2 layers: embeddings 0.5^3 of the peak, layer 0 0.5^2, layer 1 0.5, the head and pooler the peak
    assert rate[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    assert rate[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(2.5e-4)
    assert rate[id(named["bert.encoder.layer.1.output.dense.bias"])] == pytest.approx(5e-4)
    assert rate[id(named["classifier.weight"])] == rate[id(named["bert.pooler.dense.weight"])] == 1e-3
    assert len(rate) == len(named)  # every parameter in exactly one group
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] for p in group["params"]}
    assert decayed == {id(param) for param in named.values() if param.ndim >= 2}


def test_layer_decay_reads_modernbert_names_too():
    from mlm_pretrain.finetune.train import layer_decay_scale

    scale = layer_decay_scale(2, 0.5)
    rates = {
        "model.embeddings.tok_embeddings.weight": 0.125,
        "model.layers.0.attn.Wqkv.weight": 0.25,
        "model.layers.1.mlp.Wo.weight": 0.5,
        "model.final_norm.weight": 1.0,
        "head.dense.weight": 1.0,
        "classifier.bias": 1.0,
    }
    assert {name: scale(name) for name in rates} == rates
    assert layer_decay_scale(2, 1.0)("model.embeddings.tok_embeddings.weight") == 1.0
