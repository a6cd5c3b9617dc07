"""The other side of every comparison, each written once and set up the way its own documentation or example
script does: HF's `run_mlm.py` (its `datasets` preprocessing and its `Trainer`), the HF fine-tuning
`Trainer` (a careful user's setup and `run_glue.py`'s defaults), gensim's `Word2Vec`, raw `tokenizers`."""

from __future__ import annotations

import tempfile
import time
from itertools import chain
from pathlib import Path

from bench.measure import Clock

# ---------------------------------------------------------------------------------------------- run_mlm.py


def run_mlm_preprocessing(corpus: str | Path, tokenizer, seq_len: int, num_proc: int | None):
    """run_mlm.py's preprocessing of a corpus directory: `load_dataset("text")` for the .txt/.txt.gz files,
    `load_dataset("json")` for the .jsonl(.gz) ones (their `text` column), concatenated, then
    `.map(tokenize, batched=True)` with `return_special_tokens_mask=True` and `.map(group_texts,
    batched=True)` (`--preprocessing_num_workers` is `num_proc`; None is run_mlm's default). Returns
    (tokenized, grouped): the documents' tokens and the blocks the Trainer reads."""
    import datasets

    files = sorted(str(p) for p in Path(corpus).iterdir() if p.is_file())
    text_files = [f for f in files if f.endswith((".txt", ".txt.gz"))]
    json_files = [f for f in files if f.endswith((".jsonl", ".jsonl.gz"))]

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):  # verbatim from run_mlm.py
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        return {
            k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)]
            for k, t in concatenated_examples.items()
        }

    parts = []
    if text_files:
        parts.append(datasets.load_dataset("text", data_files={"train": text_files}, split="train"))
    if json_files:
        json_ds = datasets.load_dataset("json", data_files={"train": json_files}, split="train")
        parts.append(json_ds.select_columns(["text"]))
    raw = datasets.concatenate_datasets(parts)
    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    return tokenized, tokenized.map(group_texts, batched=True, num_proc=num_proc)


def blocks_dataset(blocks, tokenizer):
    """Packed blocks (a 2-D integer array) as `group_texts` leaves them in run_mlm's Arrow dataset, read
    back as run_mlm reads them (lists): what the peer trains on when it gets our stream's blocks."""
    import numpy as np
    import torch

    special = np.isin(blocks, tokenizer.all_special_ids)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {
                "input_ids": blocks[i].tolist(),
                "attention_mask": [1] * blocks.shape[1],
                "special_tokens_mask": special[i].astype(np.int64).tolist(),
            }

    return Blocks()


def mlm_trainer(
    model,
    tokenizer,
    train_dataset,
    out: str | Path,
    *,
    batch_size: int,
    max_steps: int,
    optim: dict,
    precision: str = "fp32",
    compile: bool = False,
    device: str = "cpu",
    workers: int = 0,
    logging_steps: int = 1,
    clock: Clock | None = None,
    callbacks: list = (),
    seed: int = 0,
):
    """run_mlm.py's `Trainer`: `DataCollatorForLanguageModeling(mlm_probability=0.15)`, AdamW (its default,
    fused on a GPU), a linear schedule, with `optim`'s lr, warmup (a float below 1: a fraction of the run),
    weight_decay, betas, eps and clip. `clock` ticks at every `logging_steps`-th step."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step % logging_steps == 0:
                clock.tick(state.global_step)

    cuda = device == "cuda"
    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=optim["lr"],
        lr_scheduler_type="linear",
        warmup_steps=optim["warmup"],
        weight_decay=optim["weight_decay"],
        adam_beta1=optim["betas"][0],
        adam_beta2=optim["betas"][1],
        adam_epsilon=optim["eps"],
        max_grad_norm=optim["clip"],
        bf16=precision == "bf16",
        torch_compile=compile,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        logging_steps=logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        remove_unused_columns=False,  # keep special_tokens_mask for the collator, as run_mlm.py means to
    )
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        callbacks=[*([StepClock()] if clock else []), *callbacks],
    )


# ---------------------------------------------------------------------------------------------- fine-tuning


def hf_finetune(
    model_dir: str | Path,
    task_dir: str | Path,
    *,
    careful: bool,
    lr: float,
    epochs: int,
    batch_size: int,
    max_length: int,
    precision: str = "no",
    seed: int = 0,
) -> dict:
    """Fine-tune `model_dir` on a local task (train/validation/test .jsonl, `text` and `label`) with plain
    `transformers.Trainer` and nothing of this project, and score the test split.

    careful: as the HF text-classification tutorial does: tokenized without padding,
        `DataCollatorWithPadding`, length-grouped batches, evaluation and a checkpoint every epoch, the
        best epoch by validation accuracy restored at the end (HF keeps the first on a tie).
    not careful: as run_glue.py does by default: `padding="max_length"`, `default_data_collator`, random
        order, no evaluation during training, the last epoch scored.

    examples_per_s counts the training steps only (`on_epoch_begin` to `on_epoch_end`: neither evaluation
    nor checkpoints nor the Trainer's setup)."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    task_dir = Path(task_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = ("train", "validation", "test") if careful else ("train", "test")
    raw = datasets.load_dataset(
        "json", data_files={split: str(task_dir / f"{split}.jsonl") for split in splits}
    )
    padding = False if careful else "max_length"

    def preprocess(examples):
        return tokenizer(examples["text"], padding=padding, max_length=max_length, truncation=True)

    data = raw.map(preprocess, batched=True, remove_columns=["text"])
    labels = len(set(data["train"]["label"]))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=labels)

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    class EpochTimer(TrainerCallback):
        seconds = 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            EpochTimer.seconds += time.perf_counter() - self.started

    if careful:
        selection = {
            "train_sampling_strategy": "group_by_length",  # transformers < 5: group_by_length=True
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "save_total_limit": 1,
            "load_best_model_at_end": True,
            "metric_for_best_model": "accuracy",
        }
    else:
        selection = {"eval_strategy": "no", "save_strategy": "no"}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-hf-") as checkpoints:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=checkpoints,
                per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=128,
                learning_rate=lr,
                warmup_steps=0.1,  # a float is a fraction of the run
                weight_decay=0.01,
                num_train_epochs=epochs,
                bf16=precision == "bf16",
                use_cpu=True,
                logging_strategy="no",
                report_to=[],
                seed=seed,
                disable_tqdm=True,
                **selection,
            ),
            train_dataset=data["train"],
            eval_dataset=data["validation"] if careful else None,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer) if careful else default_data_collator,
            compute_metrics=accuracy if careful else None,
            callbacks=[EpochTimer()],
        )
        metrics = trainer.train().metrics
        best_epoch = epochs
        if careful and trainer.state.best_global_step:
            best_epoch = round(trainer.state.best_global_step / trainer.state.max_steps * epochs)
        # With group_by_length, transformers 5 orders `predict` by length too (a LengthGroupedSampler in
        # `_get_eval_sampler`): score the predictions against the label_ids that came with them, never
        # against data["test"]["label"].
        test = accuracy(trainer.predict(data["test"]))
    return {
        "examples_per_s": len(data["train"]) * epochs / EpochTimer.seconds,
        "hf_train_examples_per_s": metrics["train_samples_per_second"],  # the whole train() call
        "test_accuracy": test["accuracy"],
        "best_epoch": best_epoch,
    }


# ---------------------------------------------------------------------------------------------- gensim


def gensim_word2vec(sentences: list[list[str]], config, skipgram: bool, workers: int):
    """gensim's `Word2Vec` with our `Word2VecRecipe` settings on pre-split sentences (iterable input, its
    tokenization not timed). Returns (effective words, seconds of the `train` call, WordVectors)."""
    from gensim.models import Word2Vec

    from mlm_pretrain.word_vectors import WordVectors

    model = Word2Vec(
        vector_size=config.vector_size,
        window=config.window,
        negative=config.negative,
        min_count=config.min_count,
        sample=config.sample,
        sg=int(skipgram),
        alpha=config.start_alpha,
        min_alpha=config.min_alpha,
        workers=workers,
        seed=config.seed,
    )
    model.build_vocab(sentences)
    start = time.perf_counter()
    effective, _ = model.train(sentences, total_examples=model.corpus_count, epochs=config.epochs)
    seconds = time.perf_counter() - start
    return effective, seconds, WordVectors(list(model.wv.index_to_key), model.wv.vectors, None)


def gensim_scores(words: list[str], vectors, eval_dir: Path) -> dict[str, float]:
    """gensim's own evaluation of vectors: word-pair Spearman (WordSim353, SimLex-999), analogy accuracy."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(words, vectors)
    _, wordsim, _ = kv.evaluate_word_pairs(str(eval_dir / "wordsim353.tsv"))
    _, simlex, _ = kv.evaluate_word_pairs(str(eval_dir / "simlex999.txt"))
    analogy, _ = kv.evaluate_word_analogies(str(eval_dir / "questions-words.txt"), restrict_vocab=30_000)
    return {
        "wordsim353_spearman": wordsim.statistic,
        "simlex999_spearman": simlex.statistic,
        "analogy_accuracy": analogy,
    }


# ---------------------------------------------------------------------------------------------- tokenizers


def raw_tokenizer_training(docs: list[str], kind: str, vocab_size: int, batch_size: int):
    """`Tokenizer.train_from_iterator` over documents in memory, fed lists of `batch_size` texts as the
    `tokenizers` docs advise, with our normalizer, pre-tokenizer and trainer. Returns (seconds, tokenizer)."""
    from mlm_pretrain.tokenizer import build_tokenizer_and_trainer

    tok, trainer = build_tokenizer_and_trainer(kind, vocab_size, lowercase=True, min_frequency=2)
    start = time.perf_counter()
    batches = (docs[i : i + batch_size] for i in range(0, len(docs), batch_size))
    tok.train_from_iterator(batches, trainer=trainer, length=len(docs))
    return time.perf_counter() - start, tok


def raw_encode(backend, docs: list[str], method: str) -> tuple[float, int]:
    """The fast tokenizer's `encode_batch` (or `encode_batch_fast`) over documents in memory: the ceiling of
    any loader, as it neither reads files nor packs. Returns (seconds, document tokens)."""
    start = time.perf_counter()
    encodings = getattr(backend, method)(docs, add_special_tokens=False)
    return time.perf_counter() - start, sum(len(e.ids) for e in encodings)
