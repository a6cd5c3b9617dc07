"""Our torch word2vec against gensim's Word2Vec on the same corpus, tokens and settings, in one run.

    python bench/bench_word2vec.py [--data ../shared/data] [--epochs 5] [--repeats 1] [--objective skipgram]
    python bench/bench_word2vec.py --sides ours ours-per-pair gensim   # shared noise words or per pair
    python bench/bench_word2vec.py --sides ours ours-per-pair --epochs 3 --side-epochs ours=8  # equal time

Each side trains in its own subprocess (so peak RSS is its own), the sides alternate within each repeat,
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
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, direction, machine  # noqa: E402

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


def gensim_scores(words: list[str], vectors, eval_dir: Path) -> dict[str, float]:
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


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from mlm_pretrain.objectives.word2vec import Word2Vec, Word2VecConfig, split_words
    from mlm_pretrain.word_vectors import EVAL_DIR, WordVectors, evaluate

    eval_dir = Path(str(EVAL_DIR))
    documents = read_documents(Path(args.data) / "corpus")
    config = Word2VecConfig(
        objective=args.objective,
        epochs=epochs_of(args, args.child),
        batch_size=args.batch_size,
        shared_negatives=args.child != "ours-per-pair",
    )
    if args.child != "gensim":
        model = Word2Vec.from_documents(documents, config)
        start = time.perf_counter()
        model.train(documents, workers=args.workers)
        seconds = time.perf_counter() - start
        effective, vectors = model.effective_words, model.word_vectors()
    else:
        from gensim.models import Word2Vec as GensimWord2Vec

        sentences = [split_words(d) for d in documents]
        model = GensimWord2Vec(
            vector_size=config.vector_size,
            window=config.window,
            negative=config.negative,
            min_count=config.min_count,
            sample=config.sample,
            sg=int(args.objective == "skipgram"),
            alpha=config.start_alpha,
            min_alpha=config.min_alpha,
            workers=args.workers,
            seed=config.seed,
        )
        model.build_vocab(sentences)
        start = time.perf_counter()
        effective, _ = model.train(sentences, total_examples=model.corpus_count, epochs=config.epochs)
        seconds = time.perf_counter() - start
        vectors = WordVectors(list(model.wv.index_to_key), model.wv.vectors, None)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scores = evaluate(vectors, eval_dir)
    theirs = gensim_scores(vectors.words, np.asarray(vectors.vectors), eval_dir)
    mismatch = max(abs(scores[k] - theirs[k]) for k in theirs)
    result = {
        "side": args.child,
        "epochs": config.epochs,
        "seconds": seconds,
        "effective_words": effective,
        "words_per_s": effective / seconds,
        "peak_rss_mb": peak_rss_mb,
        "eval_mismatch": mismatch,
        "threads": torch.get_num_threads(),
        **{k: scores[k] for k in theirs},
    }
    print("RESULT " + json.dumps(result))


def epochs_of(args: argparse.Namespace, side: str) -> int:
    """The epochs `side` trains: its --side-epochs entry, else --epochs."""
    epochs = {name: int(n) for name, _, n in (item.partition("=") for item in args.side_epochs)}
    return epochs.get(side, args.epochs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--side-epochs", nargs="+", default=[], metavar="SIDE=N", help="epochs of a side, e.g. at equal time"
    )
    parser.add_argument("--objective", default="skipgram", choices=["skipgram", "cbow"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["ours", "gensim"])
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        for side in args.sides if repeat % 2 == 0 else reversed(args.sides):
            command = [sys.executable, __file__, "--child", side] + sys.argv[1:]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
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
        "peak_rss_mb",
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
