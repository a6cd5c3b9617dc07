import numpy as np
import pytest

from mlm_pretrain.corpus import TextStream
from mlm_pretrain.packing import BlockStream, TokenInfo, collate
from mlm_pretrain.tokenizer import load_tokenizer

DEFAULT_TOKENIZER = "tokenizers/default-wordpiece-8k"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_TOKENIZER)


def moby(**kw):
    return TextStream(["@sample"], **kw)


def test_blocks_hold_every_token_of_every_document_in_order(tokenizer, tmp_path):
    docs = list(moby())[:400]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    blocks = list(BlockStream(TextStream([str(tmp_path / "docs.txt")]), tokenizer, 64))
    content = np.concatenate([b[1:-1] for b in blocks])
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert content[: len(expected)].tolist() == expected
    rest = content[len(expected) :]  # the last block: its closing [SEP], then padding
    assert rest[0] == tokenizer.sep_token_id and (rest[1:] == tokenizer.pad_token_id).all()
    assert all(b[0] == tokenizer.cls_token_id for b in blocks)
    assert all(b[-1] == tokenizer.sep_token_id for b in blocks[:-1])


def test_no_token_is_dropped_and_only_the_last_block_is_padded(tokenizer):
    stream = BlockStream(moby(), tokenizer, 128)
    blocks = list(stream)
    pads = [int((b == tokenizer.pad_token_id).sum()) for b in blocks]
    assert stream.tokens_read == stream.tokens_packed > 400_000
    assert sum(pads[:-1]) == 0 and 0 <= pads[-1] < 126
    assert sum(126 - p for p in pads) == stream.tokens_read


def test_state_dict_restores_the_exact_next_block_with_shuffling_and_ranks(tokenizer):
    def make(rank=0, world=1):
        return BlockStream(
            moby(seed=3, epochs=None),
            tokenizer,
            64,
            shuffle_buffer=50,
            seed=3,
            rank=rank,
            world_size=world,
            docs_per_batch=64,
        )

    stream = make()
    it = iter(stream)
    for _ in range(700):
        next(it)
    state = stream.state_dict()
    expected = [next(it) for _ in range(40)]
    resumed = make()
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(40), resumed, strict=False)]
    assert all((a == b).all() for a, b in zip(expected, got, strict=True))

    # two ranks split the same global order between them, block by block
    full = [b for _, b in zip(range(60), make(), strict=False)]
    for rank in range(2):
        mine = [b for _, b in zip(range(30), make(rank, 2), strict=False)]
        assert all((a == b).all() for a, b in zip(full[rank::2], mine, strict=True))


def test_tokenizer_batches_grow_from_a_small_first_one_and_change_no_block(tokenizer, monkeypatch):
    monkeypatch.setattr(BlockStream, "FIRST_BATCH_DOCS", 8)

    def make(docs_per_batch: int) -> tuple[BlockStream, list[int]]:
        stream = BlockStream(moby(seed=3), tokenizer, 64, docs_per_batch=docs_per_batch)
        sizes, encode = [], stream._encode
        stream._encode = lambda batch, **kw: sizes.append(len(batch)) or encode(batch, **kw)
        return stream, sizes

    growing, sizes = make(64)
    it = iter(growing)
    blocks = [next(it) for _ in range(300)]
    assert sizes[:5] == [8, 16, 32, 64, 64]
    constant, constant_sizes = make(8)
    assert all((a == b).all() for a, b in zip(blocks, constant, strict=False))
    assert set(constant_sizes) == {8}

    # a resumed stream starts again from a small batch and yields what the first would have yielded
    state = growing.state_dict()
    expected = [next(it) for _ in range(200)]
    resumed, resumed_sizes = make(64)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(200), resumed, strict=False)]
    assert resumed_sizes[0] == 8 and all((a == b).all() for a, b in zip(expected, got, strict=True))


def test_shuffle_buffer_changes_the_order_not_the_content(tokenizer):
    plain = list(BlockStream(moby(), tokenizer, 128))
    shuffled = list(BlockStream(moby(), tokenizer, 128, shuffle_buffer=100, seed=1))
    assert len(plain) == len(shuffled)
    assert sorted(map(bytes, plain)) == sorted(map(bytes, shuffled))
    assert any((a != b).any() for a, b in zip(plain, shuffled, strict=True))


def test_collate_derives_masks_documents_and_word_starts(tokenizer):
    docs = ["The whale surfaced.", "Emma laughed at Harriet's embarrassment."]
    ids = [tokenizer.cls_token_id]
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    ids += [tokenizer.sep_token_id] + [tokenizer.pad_token_id] * 3
    batch = collate([np.array(ids, dtype=np.int32)], TokenInfo(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    first_sep = tokens.index("[SEP]")
    assert batch["document_ids"][0, 1 : first_sep + 1].tolist() == [0] * first_sep
    assert batch["document_ids"][0, first_sep + 1] == 1
    assert batch["attention_mask"][0].tolist() == [1] * (len(ids) - 3) + [0] * 3
    assert batch["special_tokens_mask"][0].tolist() == [t.startswith("[") for t in tokens]
    for token, start in zip(tokens, batch["word_start"][0].tolist(), strict=True):
        assert start == (not token.startswith("##")), token
    assert any(t.startswith("##") for t in tokens)
