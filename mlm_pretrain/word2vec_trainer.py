"""`pretrain` with `objective: skipgram | cbow`: word2vec on the same corpus, recipes and run directory.

The vocabulary pass and every epoch read the corpus through `TextStream`. Several processes share the
work chunk by chunk and add up their updates after each round (see `Word2Vec.train`). A checkpoint,
every `impl.save_every` rounds, holds each process's whole state (tables, counters, random state); a
resumed run skips the words its epoch already trained on and continues bit for bit (in one process
with one worker thread). The run ends with the word-similarity and analogy scores in `metrics.jsonl`
and `final/`: `vectors.txt` and `vectors.bin` (word2vec formats, which gensim loads),
`model.safetensors` + `config.json` + `vocab.txt`, and a model card.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import yaml

log = logging.getLogger(__name__)


def pretrain_word2vec(recipe) -> dict:
    """Run (or resume) a word2vec recipe; return the evaluation scores. Every process calls this."""
    from mlm_pretrain.checkpoint import torch_save, write_atomically
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.launch import start_accelerator, threads_per_process
    from mlm_pretrain.objectives.word2vec import Word2Vec
    from mlm_pretrain.run_dir import checkpoint_to_resume, hold_run_dir, write_recipe
    from mlm_pretrain.run_log import RunLog, run_config
    from mlm_pretrain.word_vectors import evaluate

    impl = recipe.impl
    run_dir = Path(impl.out)
    # the tables live in host memory and train on the CPU: its collectives need gloo, on GPU machines too
    accelerator = start_accelerator(run_dir, cpu=True, log_with=impl.log_with)
    hold_run_dir(run_dir, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    config = dataclasses.replace(
        recipe.word2vec,
        objective=recipe.objective,
        seed=recipe.seed,
        tokenizer=recipe.word2vec.tokenizer or recipe.data.tokenizer,
    )
    checkpoint = checkpoint_to_resume(recipe, run_dir)
    write_recipe(recipe, run_dir, accelerator)

    def documents() -> TextStream:
        return TextStream(recipe.data.corpus, text_field=recipe.data.text_field, seed=recipe.seed, epochs=1)

    step = 0
    if checkpoint is None:
        model = Word2Vec.from_documents(documents(), config)
    else:
        state = torch.load(checkpoint / f"word2vec-{rank}.pt", weights_only=True)
        model = Word2Vec.from_state_dict(state["model"])
        step = state["step"]
        log.info("resumed from %s (step %d)", checkpoint, step)
    run_log = RunLog(
        run_dir,
        accelerator,
        run_config(dataclasses.asdict(recipe), len(model.vocab.words)),
        resumed_step=step,
    )
    threads = impl.threads or threads_per_process()

    def after_round(model: Word2Vec) -> bool:
        nonlocal step
        step += 1
        if step % impl.log_every == 0:
            run_log.log(
                step,
                words=model.words_done,
                effective_words=model.effective_words,
                words_per_s=model.effective_words / max(model.train_seconds, 1e-9),
            )
        if step % impl.save_every == 0:
            save(step)
        return False

    def save(at_step: int) -> None:
        def write_rank_files(partial: Path, rank: int) -> None:
            torch_save({"model": model.state_dict(), "step": at_step}, partial / f"word2vec-{rank}.pt")

        write_atomically(
            run_dir, at_step, accelerator, write_rank_files, lambda partial: None, impl.keep_last
        )

    all_reduce = torch.distributed.all_reduce if world > 1 else None
    model.train(
        documents, callback=after_round, workers=threads, rank=rank, world_size=world, all_reduce=all_reduce
    )
    save(step)
    vectors = model.word_vectors()
    metrics = evaluate(vectors)
    run_log.log(step, **metrics, effective_words=model.effective_words)
    if accelerator.is_main_process:
        export(recipe, config, vectors, run_dir / "final", metrics)
    accelerator.wait_for_everyone()
    run_log.close()
    return metrics


def export(recipe, config, vectors, out_dir: Path, metrics: dict) -> Path:
    """`final/`: both word2vec formats, the safetensors directory, the recipe and a card."""
    from mlm_pretrain.checkpoint import atomic_directory
    from mlm_pretrain.word_vectors import save_pretrained, save_word2vec_format

    rows = "\n".join(f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in metrics.items())
    recipe_yaml = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
    with atomic_directory(out_dir) as partial:
        save_word2vec_format(vectors, partial / "vectors.txt")
        save_word2vec_format(vectors, partial / "vectors.bin", binary=True)
        save_pretrained(vectors, partial, config=dataclasses.asdict(config))
        (partial / "recipe.yaml").write_text(recipe_yaml)
        (partial / "README.md").write_text(card(recipe, config, vectors, rows, recipe_yaml))
    return out_dir


def card(recipe, config, vectors, rows: str, recipe_yaml: str) -> str:
    return f"""---
tags: [mlm-pretrain, word2vec, {recipe.objective}]
---
# {recipe.objective} word vectors trained with mlm-pretrain

{len(vectors.words)} vectors of size {config.vector_size}, negative sampling, on
{", ".join(str(s if isinstance(s, str) else s.get("path")) for s in recipe.data.corpus)}.

- `vectors.txt`, `vectors.bin`: word2vec formats (`gensim.models.KeyedVectors.load_word2vec_format`).
- `model.safetensors` (tensor `embeddings`, one row per line of `vocab.txt`) and `config.json`:
  `safetensors.torch.load_file` reads them, no code from here needed.

## Evaluation
| score | value |
|---|---|
{rows}

## Recipe
```yaml
{recipe_yaml}```
"""
