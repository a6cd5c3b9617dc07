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
from mlm_pretrain.finetune.scoring import METRICS_DIR

DATA = Path(__file__).parent / "data" / "tasks"
SHIPPED_RT = Path(__file__).parents[1] / "mlm_pretrain" / "data" / "tasks" / "rt_sentiment"
TINY = FinetuneConfig(epochs=2, lrs=(1e-3,), batch_size=16, max_length=64)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny models run ~20x faster on one thread when other processes share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    card = (model_dir / "README.md").read_text()
    assert card.count("## Fine-tuning results") == 1 and "| rt_sentiment | test | accuracy |" in card
    (model_dir / "README.md").write_text(card + "\n## Licence\n\nApache-2.0\n")
    finetune(model_dir, str(DATA / "rt_sentiment"), seeds=1, config=TINY, baseline=False)
    card = (model_dir / "README.md").read_text()  # the row replaced, the section not doubled, the rest kept
    assert card.count("| rt_sentiment |") == 1 and card.count("## Fine-tuning results") == 1
    assert card.rstrip().endswith("Apache-2.0")


def test_regression_end_to_end_from_scratch_leaves_card_alone(model_dir, tmp_path):
    card = model_dir / "README.md"
    before = card.read_text() if card.exists() else None
    result = finetune(model_dir, str(DATA / "stsb"), tmp_path, seeds=1, config=TINY, from_scratch=True)
    test = result["seeds"][0]["scores"]["test"]
    assert set(test) == {"pearsonr", "spearmanr", "score", "loss"} and result["init"] == "random"
    assert result["baseline"]["scores"]["test"]["pearsonr"] > 0.3  # bag-of-words overlap predicts similarity
    assert "mean of pearsonr/spearmanr" in (tmp_path / "results.md").read_text()
    assert (card.read_text() if card.exists() else None) == before


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


def test_fine_tuning_learns_a_keyword_task_at_the_learning_rate_validation_picks(tiny_checkpoint, tmp_path):
    # A tiny model's validation score sits at the majority class for its first epochs while the loss
    # falls: stopping on the score alone ended one of these three runs there, at 0.5.
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "model")  # its card gets the results
    config = FinetuneConfig(epochs=8, lrs=(1e-5, 1e-3), batch_size=16, max_length=32)
    result = finetune(model_dir, keyword_task(tmp_path / "task"), tmp_path / "out", seeds=3, config=config)
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
