"""`pretrain` with `objective: skipgram | cbow`: word2vec on the same corpus, recipes and run directory.

The vocabulary pass and every epoch read the corpus through `TextStream`. Several processes share the
work chunk by chunk and add up their updates after each round (see `Word2Vec.train`); a round is the
run's step, its words the run's tokens, so every stop rule, signal and checkpoint cadence of `run.Run`
applies. A checkpoint holds each process's whole state (tables, counters, random state); a resumed run
skips the words its epoch already trained on and continues bit for bit (in one process with one worker
thread). The run ends with the word-similarity and analogy scores in `metrics.jsonl` and `final/`:
`vectors.txt` and `vectors.bin` (word2vec formats, which gensim loads), `model.safetensors` +
`config.json` + `vocab.txt`, and the model card.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def pretrain_word2vec(recipe) -> dict:
    """Run (or resume) a word2vec recipe; return the evaluation scores. Every process calls this."""
    from mlm_pretrain.checkpoint import CheckpointFiles, loading, torch_save
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.launch import threads_per_process
    from mlm_pretrain.objectives.word2vec import Word2Vec
    from mlm_pretrain.run import Run
    from mlm_pretrain.word_vectors import evaluate

    impl = recipe.impl
    config = dataclasses.replace(
        recipe.word2vec,
        objective=recipe.objective,
        seed=recipe.seed,
        tokenizer=recipe.word2vec.tokenizer or recipe.data.tokenizer,
    )

    def documents() -> TextStream:
        return TextStream(recipe.data.corpus, text_field=recipe.data.text_field, seed=recipe.seed, epochs=1)

    # the tables live in host memory and train on the CPU: its collectives need gloo, on GPU machines too
    with Run(recipe, cpu=True) as run:
        if run.checkpoint is None:
            model = Word2Vec.from_documents(documents(), config)
        else:
            with loading(run.checkpoint / f"word2vec-{run.rank}.pt") as file:
                model = Word2Vec.from_state_dict(torch.load(file, weights_only=True))
        run.begin(len(model.vocab.words), total=config.epochs * model.vocab.total_words, unit="word")

        def checkpoint_files() -> CheckpointFiles:
            state = model.state_dict()
            return CheckpointFiles(lambda partial, rank: torch_save(state, partial / f"word2vec-{rank}.pt"))

        def after_round(model: Word2Vec) -> bool:
            words = model.words_done - run.tokens
            run.step_done(words, bar=words)
            if run.due(impl.log_every):
                run.log(
                    words=model.words_done,
                    effective_words=model.effective_words,
                    words_per_s=model.effective_words / max(model.train_seconds, 1e-9),
                )
            run.end_step(checkpoint_files)
            return run.finished()

        all_reduce = torch.distributed.all_reduce if run.world > 1 else None
        threads = impl.threads or threads_per_process()
        model.train(
            documents,
            callback=after_round,
            workers=threads,
            rank=run.rank,
            world_size=run.world,
            all_reduce=all_reduce,
        )
        if not run.finished():  # the epochs ended: a last partial round may have been added up since
            run.step_done(model.words_done - run.tokens, bar=0)
            run.save(checkpoint_files())
        vectors = model.word_vectors()
        metrics = evaluate(vectors)
        run.finish(
            {**metrics, "effective_words": model.effective_words}, lambda d: write_vectors(vectors, config, d)
        )
    return metrics


def write_vectors(vectors, config, directory: Path) -> None:
    """Both word2vec formats and the safetensors directory."""
    from mlm_pretrain.word_vectors import save_pretrained, save_word2vec_format

    save_word2vec_format(vectors, directory / "vectors.txt")
    save_word2vec_format(vectors, directory / "vectors.bin", binary=True)
    save_pretrained(vectors, directory, config=dataclasses.asdict(config))
