import pytest
import torch

from mlm_pretrain.batches import masked_micro_batch
from mlm_pretrain.corpus import TextStream
from mlm_pretrain.models import build_model
from mlm_pretrain.objectives.mlm import SparseMLM, mask_batch
from mlm_pretrain.packing import BlockStream, TokenInfo, collate
from mlm_pretrain.schema import MaskingRecipe, ModelRecipe
from mlm_pretrain.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tokenizers/default-wordpiece-8k")


@pytest.fixture(scope="module")
def info(tokenizer):
    return TokenInfo(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer, info):
    stream = iter(BlockStream(TextStream(["@sample"]), tokenizer, 128))
    blocks = [next(stream) for _ in range(64)]
    blocks[-1][40:] = tokenizer.pad_token_id  # some padding, as a stream's last block has
    return collate(blocks, info)


def masks(batch, info, seed=0, **config):
    return mask_batch(batch, info, MaskingRecipe(**config), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("masking", ["token", "whole_word", "span"])
def test_masking_never_touches_special_or_padding_tokens_and_hits_the_rate(batch, info, masking):
    inputs, predict = masks(batch, info, masking=masking, mask_rate=0.3)
    assert not (predict & batch["special_tokens_mask"]).any()
    rate = predict.sum() / (~batch["special_tokens_mask"]).sum()
    assert 0.22 < rate < 0.36, rate  # spans overlap, words have several pieces: near, not exact
    assert (inputs[~predict] == batch["input_ids"][~predict]).all()


def test_replacement_ratios_are_80_10_10(batch, info):
    inputs, predict = masks(batch, info, mask_rate=0.5)
    original, corrupted = batch["input_ids"][predict], inputs[predict]
    as_mask = (corrupted == info.mask_id).float().mean()
    kept = (corrupted == original).float().mean()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.02
    randoms = corrupted[(corrupted != info.mask_id) & (corrupted != original)]
    assert not torch.isin(randoms, info.special_ids).any() and len(randoms) > 100


def test_whole_word_masking_takes_every_piece_of_a_word(batch, info):
    _, predict = masks(batch, info, masking="whole_word", mask_rate=0.3)
    word = torch.cumsum(batch["word_start"].long(), dim=1)
    split_words = 0
    for row in range(word.shape[0]):
        for w in word[row].unique():
            positions = (word[row] == w) & ~batch["special_tokens_mask"][row]
            if positions.sum() > 1:
                split_words += 1
                chosen = predict[row][positions]
                assert chosen.all() or not chosen.any()
    assert split_words > 50


def test_spans_are_runs_of_words(batch, info):
    _, token_predict = masks(batch, info, masking="token", mask_rate=0.15)
    _, span_predict = masks(batch, info, masking="span", mask_rate=0.15)

    def mean_run(predict):
        runs = []
        for row in predict.tolist():
            length = 0
            for value in row + [False]:
                if value:
                    length += 1
                elif length:
                    runs.append(length)
                    length = 0
        return sum(runs) / len(runs)

    assert mean_run(span_predict) > 2.5 > 1.3 > mean_run(token_predict)


def test_masks_depend_on_the_global_row_not_on_who_holds_it(batch, info):
    config = MaskingRecipe()
    full = mask_batch(batch, info, config, torch.Generator().manual_seed(7))
    rows = torch.arange(1, 64, 2)  # rank 1 of 2 holds the odd rows
    half = {k: v[rows] for k, v in batch.items()}
    part = mask_batch(half, info, config, torch.Generator().manual_seed(7), rows, 64)
    assert torch.equal(full[0][rows], part[0]) and torch.equal(full[1][rows], part[1])
    other_step = mask_batch(batch, info, config, torch.Generator().manual_seed(8))
    assert not torch.equal(full[1], other_step[1])  # dynamic masking: a new step, new masks


@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert"])
def test_sparse_head_loss_equals_the_dense_heads(batch, info, tokenizer, model_type):
    torch.manual_seed(0)
    model = build_model(
        ModelRecipe(type=model_type, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        tokenizer,
        128,
    )
    model.eval()
    small = {k: v[:8] for k, v in batch.items()}
    inputs, predict = masks(small, info)
    parts = masked_micro_batch(small["input_ids"], small["attention_mask"], inputs, predict)
    loss_sum, correct = SparseMLM(model)(**parts)
    labels = torch.where(predict, small["input_ids"], -100)
    dense = model(input_ids=inputs, attention_mask=small["attention_mask"], labels=labels)
    assert torch.allclose(loss_sum / predict.sum(), dense.loss, rtol=1e-5)
    dense_correct = (dense.logits.argmax(-1)[predict] == small["input_ids"][predict]).sum()
    assert correct == dense_correct
