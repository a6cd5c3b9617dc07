"""Recipes: the schema's types, ranges and per-objective groups as the loader enforces them, the
micro-batch rule, masking's at-least-one guarantee, and what the run directory records of a recipe."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from test_faults import run_cli

from mlm_pretrain.errors import InputError
from mlm_pretrain.objectives.mlm import mask_batch
from mlm_pretrain.recipe import load_recipe
from mlm_pretrain.schema import MaskingRecipe, PretrainRecipe, Tracker, micro_batches

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
WORD2VEC_RECIPE = ROOT / "recipes" / "word2vec-skipgram.yaml"
TOKENIZER = ROOT / "tokenizers" / "default-wordpiece-8k"


# --- numbers on the command line and in recipe files ---


@pytest.mark.parametrize(
    ("typed", "value"),
    [("1e-3", 1e-3), ("1e6", 1e6), ("1.0e6", 1e6), ("1E-4", 1e-4), (".5", 0.5), ("2", 2.0)],
)
def test_a_float_is_read_in_every_notation_from_overrides_and_files(tmp_path, typed, value):
    assert load_recipe(PretrainRecipe, TINY_RECIPE, [f"optim.lr={typed}"]).optim.lr == value
    assert load_recipe(PretrainRecipe, TINY_RECIPE, [f"lr={typed}"]).optim.lr == value
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"max_steps: 10\noptim:\n  lr: {typed}\n  eps: {typed}\n")
    recipe = load_recipe(PretrainRecipe, recipe_file)
    assert recipe.optim.lr == value and recipe.optim.eps == value
    assert isinstance(recipe.optim.lr, float)


def test_an_int_is_read_when_integral_and_refused_otherwise(tmp_path):
    recipe = load_recipe(PretrainRecipe, TINY_RECIPE, ["max_steps=1e3", "max_tokens=1_000_000"])
    assert (recipe.max_steps, recipe.max_tokens) == (1000, 1_000_000)
    assert isinstance(recipe.max_steps, int)
    for typed in ("2.5", "2.5e0", "many"):
        with pytest.raises(InputError, match=rf"command line: max_steps={typed}: expected int or null"):
            load_recipe(PretrainRecipe, TINY_RECIPE, [f"max_steps={typed}"])
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("max_tokens: 1e6\nimpl:\n  keep_last: 2.5\n")
    with pytest.raises(InputError, match=rf"{recipe_file}: impl.keep_last: expected int, got 2.5"):
        load_recipe(PretrainRecipe, recipe_file)


def test_booleans_stay_booleans():
    recipe = load_recipe(PretrainRecipe, TINY_RECIPE, ["impl.compile=true", "impl.progress=false"])
    assert recipe.impl.compile is True and recipe.impl.progress is False
    with pytest.raises(InputError, match=r"command line: optim.lr=true: expected float, got True"):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["optim.lr=true"])
    with pytest.raises(InputError, match=r"command line: impl.compile=1: expected bool, got 1"):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["impl.compile=1"])


def test_a_word_yaml_reads_as_a_boolean_stays_a_word_for_a_text_key(tmp_path):
    recipe = load_recipe(PretrainRecipe, TINY_RECIPE, ["mixed_precision=no", "impl.compile=no"])
    assert recipe.impl.mixed_precision == "no" and recipe.impl.compile is False
    # in a file the word is gone before the schema sees it: the error says how to keep it
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("max_steps: 3\nimpl:\n  mixed_precision: no\n")
    with pytest.raises(
        InputError, match=r"impl.mixed_precision: got False; valid: no, bf16, auto \(YAML reads"
    ):
        load_recipe(PretrainRecipe, recipe_file)
    recipe_file.write_text("max_steps: 3\nimpl:\n  mixed_precision: 'no'\n")
    assert load_recipe(PretrainRecipe, recipe_file).impl.mixed_precision == "no"


def test_a_wrong_override_names_the_command_line_not_the_recipe_file(tmp_path):
    cases = {
        "optim.lr=fast": r"^command line: optim.lr=fast: expected float, got 'fast'$",
        "lr=fast": r"^command line: lr=fast: expected float, got 'fast'$",
        "optim.betas=[0.9, x]": r"^command line: optim.betas=\[0.9, x\]: optim.betas\[1\]: expected float",
        "optim={lr: fast}": r"^command line: optim=\{lr: fast\}: optim.lr: expected float, got 'fast'$",
        "optim=3": r"^command line: optim=3: optim is a group of keys",
        "mask_rate=2": r"^command line: mask_rate=2: mlm.mask_rate must be in \(0, 1\), got 2.0$",
    }
    for override, message in cases.items():
        with pytest.raises(InputError, match=message):
            load_recipe(PretrainRecipe, TINY_RECIPE, ["optim.lr=1e-3", override])
    # the last override of a key is the one checked, and the one named
    with pytest.raises(InputError, match=r"^command line: optim.lr=x: expected float"):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["optim.lr=0.1", "optim.lr=x"])
    # a bad value in the file still names the file, whatever else the command line sets
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("optim:\n  lr: fast\n")
    with pytest.raises(InputError, match=rf"^{recipe_file}: optim.lr: expected float, got 'fast'$"):
        load_recipe(PretrainRecipe, recipe_file, ["optim.warmup=0.1"])


@pytest.mark.slow
def test_the_cli_refuses_a_bad_override_without_a_traceback():
    result = run_cli("pretrain", "--recipe", str(TINY_RECIPE), "optim.lr=abc")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "command line: optim.lr=abc: expected float, got 'abc'" in result.stderr


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 64\n")
    with pytest.raises(
        InputError, match=r"unknown key 'model.hidden'; valid keys in model: type, hidden_size"
    ):
        load_recipe(PretrainRecipe, bad)
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(InputError, match=r"optim.lr: expected float, got 'fast'"):
        load_recipe(PretrainRecipe, bad)
    with pytest.raises(InputError, match=r"unknown recipe key 'lr_max'; valid keys: seed, objective"):
        load_recipe(PretrainRecipe, None, ["lr_max=3"])
    recipe = load_recipe(PretrainRecipe, TINY_RECIPE, ["mask_rate=0.3", "max_steps=12", "impl.threads=1"])
    assert recipe.mlm.mask_rate == 0.3 and recipe.max_steps == 12 and recipe.impl.threads == 1
    result = run_cli("pretrain", "--recipe", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "optim.lr" in result.stderr


SHIPPED = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "mlm_pretrain/data/recipes").glob("*.yaml")])


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_is_valid(recipe):
    if recipe.name.startswith("tokenizer"):
        from mlm_pretrain.cli.tokenizer import TokenizerRecipe

        load_recipe(TokenizerRecipe, recipe)
    else:
        load_recipe(PretrainRecipe, recipe)


# --- ranges and allowed words, declared in the schema ---

BAD_VALUES = {
    # each of these was a bare traceback, a silent misuse or a run that never ends before the schema
    "optim.micro_batch_size=0": r"optim.micro_batch_size must be at least 1, got 0",
    "impl.log_every=0": r"impl.log_every must be at least 1, got 0",
    "impl.eval_every=0": r"impl.eval_every must be at least 1, got 0",
    "impl.save_every=0": r"impl.save_every must be at least 1, got 0",
    "max_steps=-1": r"max_steps must be at least 1, got -1",
    "data.seq_len=7": r"data.seq_len must be at least 8, got 7",
    "optim.lr=-1e-3": r"optim.lr must be above 0, got -0.001",
    "model.num_heads=0": r"model.num_heads must be at least 1, got 0",
    "model.num_heads=3": r"model.num_heads must divide model.hidden_size 64, got 3",
    "mlm.span_p=0": r"mlm.span_p must be in \(0, 1\], got 0.0",
    "mlm.span_p=1.5": r"mlm.span_p must be in \(0, 1\], got 1.5",
    "mlm.span_max=0": r"mlm.span_max must be at least 1, got 0",
    "mlm.mask_rate=0": r"mlm.mask_rate must be in \(0, 1\), got 0.0",
    "mlm.mask_rate=1": r"mlm.mask_rate must be in \(0, 1\), got 1.0",
    "mlm.eval_mask_rate=-0.1": r"mlm.eval_mask_rate must be in \(0, 1\), got -0.1",
    "mlm.random_token_ratio=0.5": r"mlm.random_token_ratio must be at most 1 - mlm.mask_token_ratio",
    "optim.betas=[0.9, 1.5]": r"optim.betas must be in \[0, 1\), got \[0.9, 1.5\]",
    "optim.betas=[0.9]": r"optim.betas needs two values, got \[0.9\]",
    "optim.warmup=1.5": r"optim.warmup must be in \[0, 1\], got 1.5",
    "objective=glove": r"got 'glove'; valid: mlm, .*skipgram, cbow",
    "model.type=gpt2": r"got 'gpt2'; valid: bert, roberta, modernbert",
    "mlm.masking=words": r"got 'words'; valid: token, whole_word, span",
    "optim.schedule=step": r"got 'step'; valid: linear, cosine, wsd, constant",
    "optim.on_nonfinite=ignore": r"got 'ignore'; valid: stop, skip",
    "impl.mixed_precision=fp16": r"got 'fp16'; valid: no, bf16, auto",
    "impl.parallel=tp": r"got 'tp'; valid: ddp, fsdp",
}


@pytest.mark.parametrize("override", BAD_VALUES)
def test_each_bad_value_is_refused_naming_the_key_where_it_was_set_and_the_valid_range(override):
    with pytest.raises(InputError, match=rf"^command line: {re.escape(override)}: ") as err:
        load_recipe(PretrainRecipe, TINY_RECIPE, [override])
    assert re.search(BAD_VALUES[override], str(err.value)), str(err.value)


def test_a_bad_value_in_a_file_names_the_file_and_a_word2vec_key_its_range(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("max_steps: 10\nimpl:\n  save_every: 0\n")
    with pytest.raises(InputError, match=rf"^{recipe_file}: impl.save_every must be at least 1, got 0$"):
        load_recipe(PretrainRecipe, recipe_file)
    with pytest.raises(InputError, match=r"^command line: word2vec.tokens=chars: got 'chars'; valid: words"):
        load_recipe(PretrainRecipe, WORD2VEC_RECIPE, ["word2vec.tokens=chars"])
    with pytest.raises(InputError, match=r"^command line: epochs=0: word2vec.epochs must be at least 1"):
        load_recipe(PretrainRecipe, WORD2VEC_RECIPE, ["epochs=0"])


def test_the_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(typing.get_args(Tracker)) == set(LOGGER_TYPE_TO_CLASS)


# --- groups per objective, and the stop rule mlm needs ---


def test_a_group_that_does_not_apply_to_the_objective_is_refused_when_set(tmp_path):
    with pytest.raises(
        InputError,
        match=r"^command line: word2vec.epochs=2: word2vec applies to objective skipgram \| cbow only, and "
        r"this recipe's objective is mlm",
    ):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["word2vec.epochs=2"])
    with pytest.raises(
        InputError,
        match=r"^command line: mask_rate=0.3: mlm applies to objective mlm\b.*, and this recipe's objective "
        r"is skipgram",
    ):
        load_recipe(PretrainRecipe, WORD2VEC_RECIPE, ["mask_rate=0.3"])
    recipe_file = tmp_path / "cbow.yaml"
    recipe_file.write_text("objective: cbow\noptim:\n  lr: 1.0e-3\n")
    with pytest.raises(
        InputError,
        match=rf"^{recipe_file}: optim applies to objective mlm\b.*, and this recipe's objective is cbow",
    ):
        load_recipe(PretrainRecipe, recipe_file)
    # the tiny recipe sets model, mlm and optim: switching its objective names the first of them
    with pytest.raises(
        InputError,
        match=rf"^{TINY_RECIPE}: model applies to objective mlm\b.*, and this recipe's objective is skipgram",
    ):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["objective=skipgram"])
    # the defaults of groups that do not apply are fine
    recipe = load_recipe(PretrainRecipe, WORD2VEC_RECIPE, ["objective=cbow"])
    assert recipe.objective == "cbow" and recipe.mlm == MaskingRecipe()


def test_only_mlm_needs_a_stop_rule_and_word2vec_is_not_cut_at_a_default_step():
    with pytest.raises(
        InputError,
        match=r"^recipe: max_steps is not set, nor max_tokens nor max_minutes: an mlm run needs one$",
    ):
        load_recipe(PretrainRecipe, None, [])
    assert load_recipe(PretrainRecipe, None, ["max_minutes=1"]).max_steps is None
    recipe = load_recipe(PretrainRecipe, WORD2VEC_RECIPE)
    assert (recipe.max_steps, recipe.max_tokens, recipe.max_minutes) == (None, None, None)


# --- optim.micro_batch_size is a cap ---


def test_the_micro_batch_is_the_largest_up_to_the_cap_that_divides_each_process_share():
    assert micro_batches(32, 32, 1) == (32, 1)
    assert micro_batches(32, 32, 2) == (16, 1)  # the tiny recipe under 2 processes
    assert micro_batches(64, 24, 1) == (16, 4)
    assert micro_batches(96, 32, 2) == (24, 2)
    assert micro_batches(7, 4, 1) == (1, 7)
    assert micro_batches(8, 100, 8) == (1, 1)
    for batch, cap, processes in [(32, 32, 3), (30, 8, 4), (4, 4, 8)]:
        with pytest.raises(
            InputError, match=rf"optim.batch_size {batch} does not divide by the {processes} "
        ):
            micro_batches(batch, cap, processes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_tiny_recipe_runs_under_torchrun_with_two_processes(tmp_path):
    # batch 32, micro 32: each of the 2 processes takes 16 blocks in one micro-batch
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(free_port()), "-m", "mlm_pretrain", "pretrain"),
        *("--recipe", str(TINY_RECIPE), "--out", str(tmp_path), "--max-steps", "2"),
        *("data.seq_len=32", "model.hidden_size=32", "model.intermediate_size=64", "impl.eval_blocks=32"),
        *("impl.progress=false", "impl.log_every=1", "impl.threads=1", "impl.log_with=[]"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x 16 blocks x 1 accumulation steps" in result.stdout + result.stderr
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, lines) if "loss" in r] == [1, 2]


# --- at least one masked position per block ---


@pytest.fixture(scope="module")
def batch():
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import BlockStream, TokenInfo, collate
    from mlm_pretrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    info = TokenInfo(tokenizer)
    stream = iter(BlockStream(TextStream(["@sample"]), tokenizer, 64))
    blocks = [next(stream) for _ in range(48)]
    blocks[0][:] = tokenizer.pad_token_id  # nothing to mask: it must stay so
    blocks[1][8:] = tokenizer.pad_token_id  # a short block, as a stream's last one
    return collate(blocks, info), info


@pytest.mark.parametrize("masking", ["token", "whole_word", "span"])
def test_every_block_with_a_maskable_token_gets_a_masked_one_and_the_others_keep_their_masks(batch, masking):
    batch, info = batch
    special = batch["special_tokens_mask"]
    rate = 0.01  # ~0.6 expected per block: about half the blocks draw none
    recipe = MaskingRecipe(mask_rate=rate, masking=masking)
    corrupted, chosen = mask_batch(batch, info, recipe, torch.Generator().manual_seed(3))
    assert not chosen[0].any() and not (chosen & special).any()
    assert chosen[1:].any(dim=1).all()
    # the masks drawn the usual way, from the same generator: kept wherever they chose something
    draws = torch.rand(3, *special.shape, generator=torch.Generator().manual_seed(3))
    if masking == "token":
        drawn = (draws[0] < rate) & ~special
        had = drawn.any(dim=1)
        assert 5 < had.sum() < len(had) - 5  # both kinds of block are in the test
        assert torch.equal(chosen[had], drawn[had])
        assert (chosen[~had].sum(dim=1)[1:] == 1).all()  # the empty ones: exactly one position
    else:
        word = torch.cumsum(batch["word_start"].long(), dim=1)
        for row in range(1, len(chosen)):  # whole words only
            for w in word[row][chosen[row]].unique():
                assert chosen[row][(word[row] == w) & ~special[row]].all()
    # the same blocks masked on another rank, in a global batch of which it holds every other row
    rows = torch.arange(1, len(chosen), 2)
    part = {key: value[rows] for key, value in batch.items()}
    _, chosen_there = mask_batch(part, info, recipe, torch.Generator().manual_seed(3), rows, len(chosen))
    assert torch.equal(chosen_there, chosen[rows])


# --- the run directory: recipe.yaml written atomically, the tokenizer it began with ---


class MainProcess:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def test_an_interrupted_recipe_write_leaves_the_old_recipe_whole(tmp_path):
    # a write cut short (here: a file-size limit, as a full disk cuts one) must not truncate recipe.yaml
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = yaml.safe_dump({"written": "before", "padding": "x" * 4000})
    (run_dir / "recipe.yaml").write_text(old)
    script = f"""
import resource, signal
from mlm_pretrain.recipe import load_recipe
from mlm_pretrain.run_dir import write_recipe
from mlm_pretrain.schema import PretrainRecipe

class MainProcess:
    is_main_process = True
    def wait_for_everyone(self):
        pass

recipe = load_recipe(PretrainRecipe, {str(TINY_RECIPE)!r}, ["data.tokenizer=none"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
write_recipe(recipe, {str(run_dir)!r}, MainProcess())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "File too large" in result.stderr, result.stderr[-2000:]
    assert (run_dir / "recipe.yaml").read_text() == old
    assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml"]
    # and written whole when nothing cuts it short
    from mlm_pretrain.run_dir import write_recipe

    recipe = load_recipe(PretrainRecipe, TINY_RECIPE, ["data.tokenizer=none", f"impl.out={run_dir}"])
    write_recipe(recipe, run_dir, MainProcess())
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["impl"]["out"] == str(run_dir)


def test_resume_refuses_a_tokenizer_whose_ids_changed_since_the_run_began(tmp_path, monkeypatch):
    import mlm_pretrain.checkpoint
    from mlm_pretrain.run_dir import checkpoint_to_resume, write_recipe

    tokenizer, run_dir = tmp_path / "tokenizer", tmp_path / "run"
    shutil.copytree(TOKENIZER, tokenizer)
    run_dir.mkdir()
    recipe = load_recipe(
        PretrainRecipe,
        TINY_RECIPE,
        [f"data.tokenizer={tokenizer}", f"impl.out={run_dir}", "impl.resume=true"],
    )
    write_recipe(recipe, run_dir, MainProcess())  # the first start records the tokenizer
    checkpoint = run_dir / "checkpoints" / "step-000010"  # stands for a verified checkpoint
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 10, "sharded": false}')
    monkeypatch.setattr(mlm_pretrain.checkpoint, "complete_checkpoints", lambda _: [(10, checkpoint)])
    monkeypatch.setattr(mlm_pretrain.checkpoint, "latest_checkpoint", lambda _: checkpoint)
    assert checkpoint_to_resume(recipe, run_dir) == checkpoint
    # an identical rebuild changes the training report only: still the same tokenizer
    (tokenizer / "tokenizer_report.json").write_text("{}\n")
    assert checkpoint_to_resume(recipe, run_dir) == checkpoint
    # the same path and vocabulary size, two ids swapped
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["whale"] = vocab["whale"], vocab["the"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(
        InputError, match=rf"^{tokenizer}: the tokenizer's files changed since this run began"
    ):
        checkpoint_to_resume(recipe, run_dir)


def test_a_tokenizer_is_rebuilt_in_place_atomically(tmp_path, monkeypatch):
    import mlm_pretrain.tokenizer
    from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer

    texts = (ROOT / "tests/data/austen_8k.txt").read_text(encoding="utf-8").splitlines()
    out = tmp_path / "tok"
    train_tokenizer(texts, out, vocab_size=300, min_frequency=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a rebuild that fails after writing part of the new tokenizer leaves the old one as it was
    monkeypatch.setattr(mlm_pretrain.tokenizer, "measure", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_tokenizer(texts, out, vocab_size=400, min_frequency=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    monkeypatch.undo()
    train_tokenizer(texts, out, vocab_size=400, min_frequency=1, progress=False)
    assert len(load_tokenizer(out)) == 400 and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    # a directory of other files is never replaced by a tokenizer
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"notes holds files and no tokenizer"):
        train_tokenizer(texts, tmp_path / "notes", vocab_size=300, progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_the_recipe_a_run_records_loads_back_as_the_same_recipe(recipe, tmp_path):
    if recipe.name.startswith("tokenizer-"):
        pytest.skip("a tokenizer recipe")
    loaded = load_recipe(PretrainRecipe, recipe)
    recorded = tmp_path / "recipe.yaml"  # what write_recipe and an export write
    recorded.write_text(yaml.safe_dump(loaded.to_dict(), sort_keys=False))
    assert load_recipe(PretrainRecipe, recorded) == loaded
