"""Our torch word2vec against gensim's Word2Vec on the same corpus, tokens and settings, in one run.

    python -m bench.word2vec_speed [--data ../shared/data] [--epochs 5] [--repeats 1] [--objective skipgram]
    python -m bench.word2vec_speed --sides ours ours-per-pair gensim   # shared noise words or per pair
    python -m bench.word2vec_speed --sides ours ours-per-pair --epochs 3 --side-epochs ours=8  # equal time

gensim is `bench.peers.gensim_word2vec`. Each side trains in its own subprocess (so peak RSS is its own),
the sides alternate within each repeat,
and the medians are printed. Both sides get the same documents (a line of a .txt / .txt.gz file, a line
of the `text` of a .jsonl.gz record) split by `split_words`; gensim gets them as an in-memory list of token
lists (iterable input) and its tokenization is not timed, ours tokenizes inside `train` and is timed.
Words/s counts effective words (gensim's definition: words left after min_count pruning and subsampling)
over the wall time of the training call alone (the vocabulary pass is excluded on both sides).
`ours` shares a center's noise words across its context words (the default, `shared_negatives`);
`ours-per-pair` draws them per (center, context) pair, as gensim does.
Each side's vectors are scored by our evaluation; gensim's own evaluation functions are run on the same
vectors and the largest difference between the two is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from bench.measure import machine
from bench.sides import DEFAULT_DATA, ROOT, direction, report, run_side

SIDES = ("ours", "ours-per-pair", "gensim")


def read_documents(corpus_dir: Path) -> list[str]:
    documents = []
    for path in sorted(corpus_dir.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                texts = json.loads(line)["text"].split("\n") if ".jsonl" in path.name else [line]
                documents.extend(t for t in texts if t.strip())
    return documents


def train_side(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from bench.peers import gensim_scores, gensim_word2vec
    from mlm_pretrain.objectives.word2vec import Word2Vec, split_words
    from mlm_pretrain.schema import Word2VecRecipe
    from mlm_pretrain.word_vectors import EVAL_DIR, evaluate

    eval_dir = Path(str(EVAL_DIR))
    documents = read_documents(Path(args.data) / "corpus")
    config = Word2VecRecipe(
        objective=args.objective,
        epochs=epochs_of(args, args.side),
        batch_size=args.batch_size,
        shared_negatives=args.side != "ours-per-pair",
    )
    if args.side != "gensim":
        model = Word2Vec.from_documents(documents, config)
        start = time.perf_counter()
        model.train(documents, workers=args.workers)
        seconds = time.perf_counter() - start
        effective, vectors = model.effective_words, model.word_vectors()
    else:
        sentences = [split_words(d) for d in documents]
        effective, seconds, vectors = gensim_word2vec(
            sentences, config, args.objective == "skipgram", args.workers
        )
    scores = evaluate(vectors, eval_dir)
    theirs = gensim_scores(vectors.words, np.asarray(vectors.vectors), eval_dir)
    return {
        "side": args.side,
        "epochs": config.epochs,
        "seconds": seconds,
        "effective_words": effective,
        "words_per_s": effective / seconds,
        "eval_mismatch": max(abs(scores[k] - theirs[k]) for k in theirs),
        "threads": torch.get_num_threads(),
        **{k: scores[k] for k in theirs},
    }


def epochs_of(args: argparse.Namespace, side: str) -> int:
    """The epochs `side` trains: its --side-epochs entry, else --epochs."""
    epochs = {name: int(n) for name, _, n in (item.partition("=") for item in args.side_epochs)}
    return epochs.get(side, args.epochs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--side-epochs", nargs="+", default=[], metavar="SIDE=N", help="epochs of a side, e.g. at equal time"
    )
    parser.add_argument("--objective", default="skipgram", choices=["skipgram", "cbow"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["ours", "gensim"])
    parser.add_argument("--smoke", action="store_true", help="1 epoch of every side on the repo's sample")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return report(train_side(args))
    if args.smoke:
        # the package's sample (1.8 MB): the smoke data's vocabulary covers too few evaluation pairs
        args.data, args.epochs, args.repeats = str(ROOT / "mlm_pretrain" / "data"), 1, 1
        args.sides = ["ours", "gensim"]
    forwarded = ["--data", args.data, "--epochs", str(args.epochs), "--objective", args.objective]
    forwarded += ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    forwarded += ["--side-epochs", *args.side_epochs] if args.side_epochs else []

    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        for side in args.sides if repeat % 2 == 0 else reversed(args.sides):
            result = run_side("word2vec_speed", side, forwarded, inline=args.smoke)
            results[side].append(result)
            print(json.dumps(result), flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    setup = f"{args.objective}, {args.workers} workers, batch {args.batch_size}"
    print(f"\n{setup}, medians of {args.repeats} repeat(s):")
    keys = (
        "epochs",
        "seconds",
        "words_per_s",
        "rss_mb",
        "wordsim353_spearman",
        "simlex999_spearman",
        "analogy_accuracy",
        "eval_mismatch",
    )
    print(f"{'':22}" + "".join(f"{k:>22}" for k in keys))
    for side in results:
        print(f"{side:22}" + "".join(f"{median(side, k):22.4g}" for k in keys))
    print(machine())
    if "gensim" in results:
        for side in [s for s in results if s != "gensim"]:
            ratio = median(side, "words_per_s") / median("gensim", "words_per_s")
            print(f"{side}: {direction(ratio, 'gensim')} (words/s)")


if __name__ == "__main__":
    main()
