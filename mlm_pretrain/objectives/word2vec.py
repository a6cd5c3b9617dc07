"""Skip-gram and CBOW with negative sampling (word2vec), trained in torch by hand-written SGD.

The semantics follow Mikolov et al.'s word2vec and gensim: a min-count vocabulary, subsampling of frequent
words with word2vec's formula, a dynamic window (each center draws its window uniformly from 1..window),
noise words from the unigram^0.75 distribution, and a learning rate decaying linearly from alpha to
min_alpha over the raw words of all epochs. Out-of-vocabulary and subsampled words are removed before the
windows are built, as in word2vec, so a window reaches past them; windows never cross a document.

Two departures, both for speed on a CPU: updates are summed over a batch of `batch_size` centers and applied
at once (what Hogwild's threads do concurrently, done in one step), and in skip-gram the `negative` noise
words are drawn once per center and shared by all of its context words (Ji et al. 2016, "Parallelizing
word2vec in shared and distributed memory"), which turns each center's work into two small matrix products;
`shared_negatives: false` draws them per (center, context) pair instead, as word2vec and gensim do. CBOW
draws its noise words per center, as word2vec does. No autograd: the gradients of the logistic loss
are written out and added to the two tables with `index_add_`.

Tokens are either words (split on whitespace; optionally lowercased and with ASCII punctuation replaced by
spaces first, so "don't." gives "don" and "t", much like gensim's simple_preprocess) or the ids of a trained
Hugging Face tokenizer, whose vocabulary then is the word2vec vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Full, Queue

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlm_pretrain.errors import InputError
from mlm_pretrain.schema import Word2VecRecipe
from mlm_pretrain.tokenizer import load_tokenizer
from mlm_pretrain.word_vectors import WordVectors

# Punctuation becomes a space, so it splits words rather than gluing them ("end.--Then" -> "end", "then").
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "“”‘’–—…«»"})


def split_words(text: str, lowercase: bool = True, strip_punctuation: bool = True) -> list[str]:
    """The word tokens of `text`: whitespace-split, after optional lowercasing and punctuation removal."""
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = text.translate(_PUNCTUATION)
    return text.split()


@dataclass
class Vocab:
    """The words a model has rows for, and how often the vocabulary pass saw each.

    In "words" mode only words seen at least min_count times are kept, most frequent first. In
    "tokenizer" mode row i is token id i, every id has a row, and `trained` marks the ids frequent enough
    to be trained (the rest are dropped from the text like out-of-vocabulary words).
    """

    words: list[str]
    counts: np.ndarray  # int64 per row
    total_words: int  # raw tokens of one pass, out-of-vocabulary ones included: the learning-rate clock
    trained: np.ndarray  # bool per row

    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.words)}


def build_vocab(documents: Iterable[str], config: Word2VecRecipe, tokenizer=None) -> Vocab:
    """The vocabulary pass: count every token of `documents` once and prune by min_count / max_vocab."""
    if config.tokens == "tokenizer":
        tokenizer = tokenizer or _tokenizer_of(config)
        counts = np.zeros(len(tokenizer), dtype=np.int64)
        for batch in _batched(tqdm(documents, desc="word2vec vocabulary", unit="doc"), 256):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                counts += np.bincount(ids, minlength=len(counts))
        trained = counts >= config.min_count
        if config.max_vocab and trained.sum() > config.max_vocab:
            trained[np.argsort(-counts, kind="stable")[config.max_vocab :]] = False
        words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return Vocab(words, counts, int(counts.sum()), trained)

    counter: Counter[str] = Counter()
    for doc in tqdm(documents, desc="word2vec vocabulary", unit="doc"):
        counter.update(split_words(doc, config.lowercase, config.strip_punctuation))
    total = sum(counter.values())
    # most_common sorts by count and keeps first-seen order among ties (Counter keeps insertion order).
    kept = [(w, c) for w, c in counter.most_common() if c >= config.min_count]
    if config.max_vocab:
        kept = kept[: config.max_vocab]
    if not kept:
        raise InputError(f"min_count: no word occurs {config.min_count} times in the {total} words read")
    counts = np.array([c for _, c in kept], dtype=np.int64)
    return Vocab([w for w, _ in kept], counts, total, np.ones(len(kept), dtype=bool))


def _tokenizer_of(config: Word2VecRecipe):
    """The tokenizer whose pieces are the tokens, or None for words. (Checked here, not in the config: the
    pretrain recipe fills `tokenizer` in from data.tokenizer after the config is built.)"""
    if config.tokens != "tokenizer":
        return None
    if not config.tokenizer:
        raise InputError("word2vec.tokenizer: tokens is 'tokenizer' but no tokenizer path is given")
    return load_tokenizer(config.tokenizer)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Word2Vec:
    """The two tables (input vectors `syn0`, output vectors `syn1neg`), the training loop and its state."""

    def __init__(self, config: Word2VecRecipe, vocab: Vocab, tokenizer=None) -> None:
        self.config, self.vocab = config, vocab
        self.tokenizer = tokenizer or _tokenizer_of(config)
        self._word_index = vocab.index() if config.tokens == "words" else None
        # Id -> id of the text after pruning, or -1 where the token is dropped (tokenizer mode).
        self._keep_id = torch.where(torch.from_numpy(vocab.trained), torch.arange(len(vocab.words)), -1)
        self.generator = torch.Generator().manual_seed(config.seed)
        size, dim = len(vocab.words), config.vector_size
        # word2vec's initialisation: input vectors uniform in +-0.5/dim, output vectors zero.
        self.syn0 = (torch.rand(size, dim, generator=self.generator) - 0.5) / dim
        self.syn1neg = torch.zeros(size, dim)
        # what a checkpoint holds: the generator after the draws of the last chunk trained (it runs ahead)
        self._generator_state = self.generator.get_state()
        # Workers gather and multiply in parallel but add to the tables in turn: torch promises nothing
        # for concurrent index_add_ on the same rows, and frequent rows are hit by every batch.
        self._update_lock = threading.Lock()
        counts = torch.from_numpy(vocab.counts).double() * torch.from_numpy(vocab.trained)
        noise = counts**0.75
        self._noise_cdf = (noise.cumsum(0) / noise.sum()).float()
        self._keep_prob = _keep_probabilities(counts, config.sample).float()
        self.epoch = 0
        self.chunks_in_epoch = 0
        self.words_in_epoch = 0  # raw words of the current epoch already trained on
        self.effective_words = 0  # words trained on as centers (after pruning and subsampling)
        self.train_seconds = 0.0

    @classmethod
    def from_documents(cls, documents: Iterable[str], config: Word2VecRecipe) -> Word2Vec:
        tokenizer = _tokenizer_of(config)
        return cls(config, build_vocab(documents, config, tokenizer), tokenizer)

    @property
    def words_done(self) -> int:
        return self.epoch * self.vocab.total_words + self.words_in_epoch

    def train(
        self,
        documents: Callable[[], Iterable[str]] | Iterable[str],
        callback: Callable[[Word2Vec], bool] | None = None,
        skip_done: bool = True,
        workers: int = 1,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Train for the configured epochs, from where the state says training stopped.

        `documents` is re-read every epoch: a function returning a fresh iterable, or a re-iterable such as
        a list. `callback(self)` runs after every chunk (a place to checkpoint); returning True stops.
        On resume the words already done in the current epoch are skipped, unless `skip_done` is False
        because the source restores its own position (a corpus stream with load_state_dict).

        `workers` threads share each chunk's batches, as word2vec's and gensim's threads share the text
        (Hogwild: each reads the tables while others update them; only the adds take turns), so with more
        than one the result is not reproducible bit for bit. Torch's own intra-op threads are set to 1
        meanwhile: the workers are the parallelism, and nested thread pools on few cores stall each other.

        With `world_size` processes, every process reads the same chunks and trains every
        `world_size`-th of them (rank `rank`'s share); after each round of `world_size` chunks they add up
        their updates with `all_reduce` (an in-place sum across processes), so each sees all the updates
        and the learning rate is not diluted, and the callback runs only then, when the tables agree.
        """
        if not callable(documents) and iter(documents) is documents:
            raise InputError(
                "documents: a one-shot iterator cannot be read once per epoch; pass a list "
                "or a function returning a fresh iterable"
            )
        # the tables as all processes last agreed on them (identical at the start: same seed or checkpoint);
        # a process's own updates since then are the difference
        self._synced = (self.syn0.clone(), self.syn1neg.clone()) if world_size > 1 else ()
        intra_op_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            while self.epoch < self.config.epochs:
                docs = documents() if callable(documents) else documents
                skip = self.words_in_epoch if skip_done else 0
                chunks = _in_background(
                    self._prepared(self._chunks(docs, skip), self.chunks_in_epoch, rank, world_size)
                )
                for raw_words, prepared, generator_state in chunks:
                    start = time.perf_counter()
                    if prepared is not None:
                        self._train_batches(*prepared, raw_words, pool, workers)
                    self._generator_state = generator_state
                    self.chunks_in_epoch += 1
                    self.words_in_epoch += raw_words
                    if world_size > 1 and self.chunks_in_epoch % world_size == 0:
                        self._add_updates_of_all_processes(all_reduce)
                    self.train_seconds += time.perf_counter() - start
                    in_step = world_size == 1 or self.chunks_in_epoch % world_size == 0
                    if in_step and callback is not None and callback(self):
                        chunks.close()
                        self.generator.set_state(self._generator_state)  # undo the draws made ahead
                        return
                if world_size > 1 and self.chunks_in_epoch % world_size:
                    self._add_updates_of_all_processes(all_reduce)
                self.epoch += 1
                self.words_in_epoch = self.chunks_in_epoch = 0
        finally:
            torch.set_num_threads(intra_op_threads)
            if pool is not None:
                pool.shutdown()

    def _add_updates_of_all_processes(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        for table, synced in zip((self.syn0, self.syn1neg), self._synced, strict=True):
            update = table - synced
            all_reduce(update)
            torch.add(synced, update, out=table)
            synced.copy_(table)

    def _chunks(
        self, documents: Iterable[str], skip: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(raw word count, kept ids, document index of each id) for runs of whole documents."""
        pieces, raw = [], 0
        for doc in documents:
            ids = self._encode(doc)
            if skip > 0:  # resuming: whole chunks were trained, so this ends on a document boundary
                skip -= len(ids)
                continue
            pieces.append(ids)
            raw += len(ids)
            if raw >= self.config.chunk_words:
                yield self._join(pieces, raw)
                pieces, raw = [], 0
        if pieces:
            yield self._join(pieces, raw)

    def _encode(self, doc: str) -> list[int]:
        if self._word_index is None:
            return self.tokenizer(doc, add_special_tokens=False)["input_ids"]
        index = self._word_index
        return [
            index.get(w, -1) for w in split_words(doc, self.config.lowercase, self.config.strip_punctuation)
        ]

    def _join(self, pieces: list[list[int]], raw: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=raw))
        doc_of = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([len(p) for p in pieces]))
        if self._word_index is None:
            ids = self._keep_id[ids]
        kept = ids >= 0
        return raw, ids[kept], doc_of[kept]

    def _prepared(
        self, chunks: Iterator[tuple[int, torch.Tensor, torch.Tensor]], first: int, rank: int, world_size: int
    ) -> Iterator[tuple[int, tuple[list, int] | None, torch.Tensor]]:
        """(raw words, this process's batches of the chunk and its effective word count, or None where
        another process trains it, the generator's state after the chunk's draws) for each chunk, the
        first being the epoch's chunk number `first`. It runs ahead of training, in the background, so
        a checkpoint must hold the state that comes with the chunk trained last, not the generator's."""
        for index, (raw_words, ids, doc_of) in enumerate(chunks, start=first):
            prepared = self._batches(ids, doc_of) if index % world_size == rank else None
            yield raw_words, prepared, self.generator.get_state()

    def _batches(self, ids: torch.Tensor, doc_of: torch.Tensor) -> tuple[list, int]:
        """A chunk's batches in training order, after subsampling, windows and noise draws, and the
        number of words left as centers."""
        cfg, gen = self.config, self.generator
        keep = torch.rand(len(ids), generator=gen) < self._keep_prob[ids]
        ids, doc_of = ids[keep], doc_of[keep]
        if len(ids) == 0:
            return [], 0
        context, valid, reach = context_windows(ids, doc_of, cfg.window, gen)
        per_pair = cfg.objective == "skipgram" and not cfg.shared_negatives
        draws = (len(ids), 2 * cfg.window, cfg.negative) if per_pair else (len(ids), cfg.negative)
        noise = torch.searchsorted(self._noise_cdf, torch.rand(draws, generator=gen).view(len(ids), -1))
        noise = noise.clamp_(max=len(self._noise_cdf) - 1).view(draws)
        centers = ids.view(-1, *([1] * (len(draws) - 1))).expand(*draws[:-1], 1)
        targets = torch.cat([centers, noise], dim=-1)  # [N, (2 * window,) 1 + negative]
        if cfg.objective == "cbow":  # a center without any context word has nothing to predict from
            reach = reach.masked_fill(~valid.any(1), 0)
        # Centers grouped by window: a batch then holds exactly 2 * reach context slots per center instead
        # of 2 * window mostly empty ones, which cuts the gathers, products and scatters by ~40%.
        batches = []
        for r in range(1, cfg.window + 1):
            rows = (reach == r).nonzero().squeeze(1)
            slots = slice(cfg.window - r, cfg.window + r)
            for start in range(0, len(rows), cfg.batch_size):
                batch = rows[start : start + cfg.batch_size]
                batch_targets = targets[batch, slots] if per_pair else targets[batch]
                batches.append((context[batch, slots], valid[batch, slots], batch_targets))
        order = torch.randperm(len(batches), generator=gen).tolist()  # windows of all sizes at every stage
        return [batches[i] for i in order], len(ids)

    def _train_batches(
        self,
        batches: list,
        effective_words: int,
        raw_words: int,
        pool: ThreadPoolExecutor | None,
        workers: int,
    ) -> None:
        cfg = self.config
        if cfg.objective == "cbow":
            step = self._cbow_step
        else:
            step = self._skipgram_step if cfg.shared_negatives else self._skipgram_pair_step
        total = cfg.epochs * self.vocab.total_words

        def run(share: list[int]) -> None:
            for i in share:
                progress = (self.words_done + raw_words * i / len(batches)) / total
                lr = max(cfg.start_alpha - (cfg.start_alpha - cfg.min_alpha) * progress, cfg.min_alpha)
                step(*batches[i], lr)

        if pool is None:
            run(list(range(len(batches))))
        else:  # interleaved shares, so the workers move through the learning-rate schedule together
            list(pool.map(run, [list(range(w, len(batches), workers)) for w in range(workers)]))
        self.effective_words += effective_words

    def _skipgram_step(self, context: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, lr: float):
        # Each context word's input vector predicts the center (label 1) and the center's noise words (0).
        inputs = F.embedding(context, self.syn0)  # [B, 2*window, dim]
        outputs = F.embedding(targets, self.syn1neg)  # [B, 1 + negative, dim]
        grad = _logistic_gradient(torch.bmm(inputs, outputs.transpose(1, 2)), targets, lr)
        grad.mul_(valid[:, :, None])
        grad_inputs = torch.bmm(grad, outputs)
        grad_outputs = torch.bmm(grad.transpose(1, 2), inputs)
        with self._update_lock:
            self.syn0.index_add_(0, context.reshape(-1), grad_inputs.view(-1, grad_inputs.shape[-1]))
            self.syn1neg.index_add_(0, targets.reshape(-1), grad_outputs.view(-1, grad_outputs.shape[-1]))

    def _skipgram_pair_step(
        self, context: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, lr: float
    ):
        # As _skipgram_step, with noise words of each (center, context) pair its own: targets [B, S, 1 + neg]
        inputs = F.embedding(context, self.syn0)  # [B, S, dim]
        outputs = F.embedding(targets, self.syn1neg)  # [B, S, 1 + negative, dim]
        grad = _logistic_gradient((outputs @ inputs[..., None]).squeeze(-1), targets, lr)
        grad.mul_(valid[:, :, None])
        grad_inputs = (grad[:, :, None, :] @ outputs).squeeze(2)
        grad_outputs = grad[..., None] * inputs[:, :, None, :]
        with self._update_lock:
            self.syn0.index_add_(0, context.reshape(-1), grad_inputs.view(-1, grad_inputs.shape[-1]))
            self.syn1neg.index_add_(0, targets.reshape(-1), grad_outputs.view(-1, grad_outputs.shape[-1]))

    def _cbow_step(self, context: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor, lr: float):
        # The mean of the context's input vectors predicts the center; word2vec then adds the whole
        # gradient of that mean (not divided by the count) to every context word.
        weights = valid.float()
        inputs = F.embedding(context, self.syn0)
        hidden = torch.bmm(weights[:, None, :], inputs).squeeze(1) / weights.sum(1, keepdim=True)
        outputs = F.embedding(targets, self.syn1neg)
        grad = _logistic_gradient(torch.bmm(outputs, hidden[:, :, None]).squeeze(2), targets, lr)
        grad_hidden = torch.bmm(grad[:, None, :], outputs).squeeze(1)
        grad_outputs = grad[:, :, None] * hidden[:, None, :]
        rows = valid.nonzero()
        with self._update_lock:
            self.syn0.index_add_(0, context[rows[:, 0], rows[:, 1]], grad_hidden[rows[:, 0]])
            self.syn1neg.index_add_(0, targets.reshape(-1), grad_outputs.view(-1, grad_outputs.shape[-1]))

    def word_vectors(self) -> WordVectors:
        """The trained input vectors, most frequent word first (the usual order for restricted evaluation)."""
        order = torch.from_numpy(np.argsort(-self.vocab.counts, kind="stable"))
        order = order[torch.from_numpy(self.vocab.trained)[order]]
        words = [self.vocab.words[i] for i in order.tolist()]
        return WordVectors(words, self.syn0[order].numpy().copy(), self.vocab.counts[order.numpy()])

    def state_dict(self) -> dict:
        """Everything needed to continue training bit for bit: config, vocabulary, tables, counters, RNG."""
        return {
            "config": dataclasses.asdict(self.config),
            "vocab": {
                "words": self.vocab.words,
                "counts": torch.from_numpy(self.vocab.counts),
                "total_words": self.vocab.total_words,
                "trained": torch.from_numpy(self.vocab.trained),
            },
            "syn0": self.syn0.clone(),
            "syn1neg": self.syn1neg.clone(),
            "epoch": self.epoch,
            "chunks_in_epoch": self.chunks_in_epoch,
            "words_in_epoch": self.words_in_epoch,
            "effective_words": self.effective_words,
            "train_seconds": self.train_seconds,
            "generator": self._generator_state.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, tokenizer=None) -> Word2Vec:
        vocab = state["vocab"]
        vocab = Vocab(vocab["words"], vocab["counts"].numpy(), vocab["total_words"], vocab["trained"].numpy())
        model = cls(Word2VecRecipe(**state["config"]), vocab, tokenizer)
        model.load_state_dict(state)
        return model

    def load_state_dict(self, state: dict) -> None:
        self.syn0.copy_(state["syn0"])
        self.syn1neg.copy_(state["syn1neg"])
        self.epoch, self.words_in_epoch = state["epoch"], state["words_in_epoch"]
        self.chunks_in_epoch = state["chunks_in_epoch"]
        self.effective_words, self.train_seconds = state["effective_words"], state["train_seconds"]
        self.generator.set_state(state["generator"])
        self._generator_state = state["generator"].clone()


def _in_background(items: Iterator, depth: int = 2) -> Generator:
    """Yield from `items`, computed by a thread up to `depth` items ahead.

    Tokenizing the next chunk is Python holding the GIL, and making its batches (subsampling, windows,
    noise draws) was a third of a worker's time when it ran between chunks while the workers waited; the
    torch ops of the training workers release the GIL, so the two overlap instead of taking turns.
    Closing the generator stops the thread.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                queue.put(message, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except Exception as error:  # re-raised in the consumer's thread
            put(("error", error))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def _keep_probabilities(counts: torch.Tensor, sample: float) -> torch.Tensor:
    """word2vec's subsampling: keep a word of count c with probability (sqrt(c / t) + 1) * t / c, where
    t = sample * (words in the vocabulary)."""
    if sample == 0:
        return torch.ones_like(counts)
    threshold = sample * counts.sum()
    prob = ((counts / threshold).sqrt() + 1) * threshold / counts.clamp(min=1)
    return prob.clamp(max=1.0)


def context_windows(
    ids: torch.Tensor, doc_of: torch.Tensor, window: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The context of every position: ids [N, 2*window] (offsets -window..-1, 1..window), which of them
    are real, and each center's window.

    Each center draws its window uniformly from 1..window (word2vec's "reduced window"); a slot is real
    when it is inside that window and in the same document. Unreal slots hold id 0 and must be masked.
    """
    n = len(ids)
    reach = torch.randint(1, window + 1, (n,), generator=generator)
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    positions = torch.arange(n)[:, None] + offsets
    inside = (positions >= 0) & (positions < n)
    positions.clamp_(0, n - 1)
    valid = inside & (doc_of[positions] == doc_of[:, None]) & (offsets.abs() <= reach[:, None])
    return ids[positions].masked_fill_(~valid, 0), valid, reach


def _logistic_gradient(scores: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
    """lr * (label - sigmoid(score)), label 1 for the first target and 0 for the noise words after it.

    A noise word equal to the center is skipped, as word2vec does.
    """
    grad = scores.sigmoid_().neg_()
    grad[..., 0] += 1.0
    grad.mul_(lr)
    clash = targets[..., 1:] == targets[..., :1]  # [B, (S,) negative]
    if clash.any():
        while clash.dim() < grad.dim():  # noise words shared by a center's context slots
            clash = clash.unsqueeze(-2)
        grad[..., 1:].masked_fill_(clash, 0.0)
    return grad
