"""Word vectors once trained: export formats, the standard evaluations, and BERT embedding initialisation.

Formats:
- word2vec text and binary (`save_word2vec_format`), the files gensim's
  `KeyedVectors.load_word2vec_format(path, binary=...)` and the original word2vec tools read.
- a directory (`save_pretrained`): `model.safetensors` with `embeddings` (float32 [words, dim], the input
  vectors) and `counts` (int64), `vocab.txt` (one word a line, row order, most frequent first) and
  `config.json`. `safetensors.torch.load_file` reads the tensors; it is not an `AutoModel` checkpoint,
  because no transformers class is a bare embedding table. `init_embeddings_from_word2vec` puts the
  vectors into a real model.

Evaluation re-implements gensim's `evaluate_word_pairs` and `evaluate_word_analogies` (case-insensitive, a
word's most frequent case variant stands for it, questions with unknown words skipped and counted), so
the scores are comparable with gensim's without depending on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from mlm_pretrain.errors import InputError

EVAL_DIR = resources.files("mlm_pretrain") / "data" / "word_vectors_eval"


@dataclass
class WordVectors:
    words: list[str]  # most frequent first
    vectors: np.ndarray  # float32 [len(words), dim]
    counts: np.ndarray | None = None  # int64 training-corpus frequency per word

    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}


def _check_words(words: list[str]) -> None:
    for word in words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"word {word!r} is empty or holds whitespace: the file formats cannot store it")


def save_word2vec_format(vectors: WordVectors, path: str | Path, binary: bool = False) -> None:
    """word2vec's format: a `count dim` header line, then per word the word, a space and its vector,
    as decimal text or as little-endian float32 bytes (`binary`), each entry ending in a newline."""
    _check_words(vectors.words)
    matrix = np.ascontiguousarray(vectors.vectors, dtype="<f4")
    with open(path, "wb") as out:
        out.write(f"{matrix.shape[0]} {matrix.shape[1]}\n".encode())
        for word, row in zip(vectors.words, matrix, strict=True):
            if binary:
                out.write(word.encode() + b" " + row.tobytes() + b"\n")
            else:
                out.write(f"{word} {' '.join(repr(float(x)) for x in row)}\n".encode())


def load_word2vec_format(path: str | Path, binary: bool = False) -> WordVectors:
    with open(path, "rb") as f:
        header = f.readline().split()
        try:
            size, dim = int(header[0]), int(header[1])
        except (IndexError, ValueError) as error:
            raise InputError(f"{path}: line 1 is not a `count dim` word2vec header") from error
        words, matrix = [], np.empty((size, dim), dtype=np.float32)
        for i in range(size):
            if binary:
                word = b""
                while (c := f.read(1)) != b" ":
                    if not c:
                        raise InputError(f"{path}: file ends in entry {i + 1} of {size}")
                    word += c
                words.append(word.decode().lstrip("\n"))
                matrix[i] = np.frombuffer(f.read(4 * dim), dtype="<f4")
            else:
                parts = f.readline().decode().rstrip("\n").split(" ")
                if len(parts) != dim + 1:
                    raise InputError(f"{path}: line {i + 2} has {len(parts) - 1} numbers, not {dim}")
                words.append(parts[0])
                matrix[i] = [float(x) for x in parts[1:]]
    return WordVectors(words, matrix)


def save_pretrained(vectors: WordVectors, directory: str | Path, config: dict | None = None) -> None:
    """A directory of `model.safetensors` (embeddings, counts), `vocab.txt` and `config.json`."""
    from safetensors.torch import save_file

    _check_words(vectors.words)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": torch.from_numpy(np.ascontiguousarray(vectors.vectors, dtype=np.float32))}
    if vectors.counts is not None:
        tensors["counts"] = torch.from_numpy(np.asarray(vectors.counts, dtype=np.int64))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "vocab.txt").write_text("".join(w + "\n" for w in vectors.words), encoding="utf-8")
    meta = {
        "model_type": "word2vec",
        "vocab_size": len(vectors.words),
        "vector_size": vectors.vectors.shape[1],
    }
    (directory / "config.json").write_text(json.dumps({**meta, "training": config or {}}, indent=2) + "\n")


def load_pretrained(directory: str | Path) -> WordVectors:
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(directory / "model.safetensors")
    words = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    counts = tensors["counts"].numpy() if "counts" in tensors else None
    return WordVectors(words, tensors["embeddings"].numpy(), counts)


def _surface(word: str) -> str:
    # Byte-level BPE and SentencePiece mark a word's first piece; the word itself is what eval sets hold.
    return word.removeprefix("Ġ").removeprefix("▁")


def _lookup(vectors: WordVectors, restrict_vocab: int, case_insensitive: bool) -> dict[str, int]:
    """gensim's `ok_vocab`: the first `restrict_vocab` words, and for case variants the most frequent."""
    fold = str.upper if case_insensitive else str
    lookup: dict[str, int] = {}
    for i, word in enumerate(vectors.words[:restrict_vocab]):
        lookup.setdefault(fold(_surface(word)), i)
    return lookup


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def evaluate_word_pairs(
    vectors: WordVectors, path: str | Path, restrict_vocab: int = 300_000, case_insensitive: bool = True
) -> dict:
    """Spearman and Pearson correlation of cosine similarity with the human scores of a tab-separated
    `word word score` file (`#` lines are comments); pairs with an unknown word are skipped and counted."""
    lookup = _lookup(vectors, restrict_vocab, case_insensitive)
    fold = str.upper if case_insensitive else str
    gold, left, right, oov = [], [], [], 0
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        try:
            a, b, score = line.split("\t")
            score = float(score)
        except ValueError as error:
            raise InputError(f"{path}: line {line_no} is not `word<TAB>word<TAB>score`") from error
        if fold(a) not in lookup or fold(b) not in lookup:
            oov += 1
            continue
        gold.append(score)
        left.append(lookup[fold(a)])
        right.append(lookup[fold(b)])
    if len(gold) < 2:
        return {"spearman": math.nan, "pearson": math.nan, "pairs": len(gold), "oov": oov}
    unit = _unit(vectors.vectors[:restrict_vocab].astype(np.float64))
    cosine = (unit[left] * unit[right]).sum(1)
    return {
        "spearman": float(stats.spearmanr(gold, cosine).statistic),
        "pearson": float(stats.pearsonr(gold, cosine).statistic),
        "pairs": len(gold),
        "oov": oov,
    }


def evaluate_word_analogies(
    vectors: WordVectors, path: str | Path, restrict_vocab: int = 30_000, case_insensitive: bool = True
) -> dict:
    """Accuracy on `a b c d` analogies ("a is to b as c is to d") by 3CosAdd over the first
    `restrict_vocab` words, as gensim's `evaluate_word_analogies`: the answer is the nearest of
    b - a + c (unit vectors) that is none of a, b, c; questions with an unknown word are skipped and
    counted."""
    lookup = _lookup(vectors, restrict_vocab, case_insensitive)
    fold = str.upper if case_insensitive else str
    questions, oov, section = [], 0, None
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith(": "):
            section = line[2:].strip()
            continue
        if section is None:
            raise InputError(f"{path}: line {line_no} comes before any `: section` header")
        words = [fold(w) for w in line.split()]
        if len(words) != 4:
            continue
        if any(w not in lookup for w in words):
            oov += 1
            continue
        questions.append(words)
    if not questions:
        return {"accuracy": 0.0, "correct": 0, "questions": 0, "oov": oov}
    unit = _unit(vectors.vectors[:restrict_vocab].astype(np.float32))
    folded = [fold(_surface(w)) for w in vectors.words[:restrict_vocab]]
    index = np.array([[lookup[w] for w in q] for q in questions])
    correct = 0
    for start in range(0, len(questions), 1024):
        a, b, c, _ = index[start : start + 1024].T
        query = unit[b] + unit[c] - unit[a]
        sims = query @ unit.T
        rows = np.arange(len(a))
        sims[rows, a] = sims[rows, b] = sims[rows, c] = -np.inf  # gensim drops the inputs' own rows
        top = np.argpartition(-sims, 5, axis=1)[:, :5]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1)
        for question, candidates in zip(questions[start : start + 1024], top, strict=True):
            ignore = set(question[:3])
            # The first of the 5 nearest whose folded form is not an input (another case of one may rank).
            predicted = None
            for candidate in candidates:
                predicted = folded[candidate]
                if predicted not in ignore:
                    break
            correct += predicted == question[3]
    return {"accuracy": correct / len(questions), "correct": correct, "questions": len(questions), "oov": oov}


def evaluate(vectors: WordVectors, directory: str | Path | None = None) -> dict[str, float]:
    """WordSim-353 and SimLex-999 Spearman, and analogy accuracy over the 30k most frequent words."""
    directory = Path(directory) if directory else EVAL_DIR
    wordsim = evaluate_word_pairs(vectors, directory / "wordsim353.tsv")
    simlex = evaluate_word_pairs(vectors, directory / "simlex999.txt")
    analogies = evaluate_word_analogies(vectors, directory / "questions-words.txt", restrict_vocab=30_000)
    return {
        "wordsim353_spearman": wordsim["spearman"],
        "wordsim353_oov": wordsim["oov"],
        "simlex999_spearman": simlex["spearman"],
        "simlex999_oov": simlex["oov"],
        "analogy_accuracy": analogies["accuracy"],
        "analogy_questions": analogies["questions"],
        "analogy_oov": analogies["oov"],
    }


def init_embeddings_from_word2vec(model, vectors: WordVectors, tokenizer, seed: int = 0) -> int:
    """Copy word vectors into the input embeddings of a transformers model, for the tokens they share.

    A token's row is set when the token string (as `tokenizer.convert_ids_to_tokens` spells it) is a word
    of `vectors`; other rows keep their initialisation. When vector_size != hidden_size the vectors go
    through a fixed random Gaussian projection (entries N(0, 1/hidden), seeded), which keeps cosine
    similarities approximately (Johnson-Lindenstrauss). The result is then scaled so the rows' standard
    deviation equals that of the model's current embedding matrix: word2vec's vectors are ~10x larger than
    a transformer's initialisation, and the position and type embeddings are added at that small scale.
    Returns the number of rows set.
    """
    weight = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    pairs = [(vocab[w], i) for i, w in enumerate(vectors.words) if w in vocab]
    if not pairs:
        return 0
    token_ids, rows = (torch.tensor(x) for x in zip(*pairs, strict=True))
    matrix = torch.from_numpy(np.asarray(vectors.vectors, dtype=np.float32))[rows]
    hidden = weight.shape[1]
    if matrix.shape[1] != hidden:
        generator = torch.Generator().manual_seed(seed)
        matrix = matrix @ (torch.randn(matrix.shape[1], hidden, generator=generator) / math.sqrt(hidden))
    with torch.no_grad():
        matrix = matrix * (weight.float().std() / matrix.std())
        weight[token_ids] = matrix.to(weight.dtype)
    return len(pairs)
