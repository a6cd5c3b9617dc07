"""Build BERT, RoBERTa or ModernBERT masked-LM models from `transformers` configs, sized by the recipe.

Vocabulary size and special-token ids come from the tokenizer; a recipe that states a different
vocabulary size is an error, not a silent resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlm_pretrain.errors import InputError

MODEL_TYPES = ("bert", "roberta", "modernbert")


@dataclass
class ModelRecipe:
    type: str = "bert"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    dropout: float = 0.0  # no dropout for short single-epoch pretraining, as Cramming and ModernBERT
    vocab_size: int | None = None  # default: the tokenizer's; any other value is an error
    max_position_embeddings: int | None = None  # default: the sequence length
    init_from: str | None = None  # an HF masked-LM directory to continue from instead of random weights
    # a word2vec run's final/ directory, trained with `word2vec.tokens: tokenizer` over the same tokenizer:
    # its vectors initialise the input embeddings (projected if their size differs)
    init_embeddings: str | None = None


def build_model(recipe: ModelRecipe, tokenizer, seq_len: int) -> torch.nn.Module:
    """A freshly initialised (or `init_from`) masked-LM model matching `tokenizer`, with SDPA attention."""
    from transformers import AutoModelForMaskedLM

    vocab = len(tokenizer)
    if recipe.vocab_size is not None and recipe.vocab_size != vocab:
        raise InputError(
            f"model.vocab_size is {recipe.vocab_size} but the tokenizer has {vocab} tokens; "
            "leave model.vocab_size unset to take the tokenizer's"
        )
    if recipe.init_from:
        model = AutoModelForMaskedLM.from_pretrained(
            recipe.init_from, attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False
        )
        if model.config.vocab_size != vocab:
            raise InputError(
                f"{recipe.init_from}: config.json has vocab_size {model.config.vocab_size}, "
                f"the tokenizer has {vocab} tokens"
            )
        return model
    positions = recipe.max_position_embeddings or seq_len
    if positions < seq_len:
        raise InputError(f"model.max_position_embeddings {positions} is shorter than data.seq_len {seq_len}")
    model = _model_class(recipe.type)(_config(recipe, tokenizer, positions))
    if recipe.init_embeddings:
        from mlm_pretrain.word_vectors import init_embeddings_from_word2vec, load_pretrained

        rows = init_embeddings_from_word2vec(model, load_pretrained(recipe.init_embeddings), tokenizer)
        if rows == 0:
            raise InputError(
                f"model.init_embeddings: no vector in {recipe.init_embeddings} matches a token of "
                "the tokenizer; train the vectors with word2vec.tokens: tokenizer over it"
            )
    return model


def _config(recipe: ModelRecipe, tokenizer, positions: int):
    from transformers import BertConfig, ModernBertConfig, RobertaConfig

    ids = {"pad_token_id": tokenizer.pad_token_id}
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.hidden_size,
        "num_hidden_layers": recipe.num_layers,
        "num_attention_heads": recipe.num_heads,
        "intermediate_size": recipe.intermediate_size,
    }
    if recipe.hidden_size % recipe.num_heads:
        raise InputError(
            f"model.hidden_size {recipe.hidden_size} is not a multiple of model.num_heads {recipe.num_heads}"
        )
    if recipe.type == "bert":
        config = BertConfig(
            **shape,
            **ids,
            max_position_embeddings=positions,
            hidden_dropout_prob=recipe.dropout,
            attention_probs_dropout_prob=recipe.dropout,
        )
    elif recipe.type == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so it needs two more position embeddings
        config = RobertaConfig(
            **shape,
            **ids,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            max_position_embeddings=positions + 2,
            hidden_dropout_prob=recipe.dropout,
            attention_probs_dropout_prob=recipe.dropout,
        )
    elif recipe.type == "modernbert":
        config = ModernBertConfig(
            **shape,
            **ids,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            max_position_embeddings=positions,
            attention_dropout=recipe.dropout,
            mlp_dropout=recipe.dropout,
            embedding_dropout=recipe.dropout,
        )
    else:
        raise InputError(f"unknown model.type {recipe.type!r}; valid: {', '.join(MODEL_TYPES)}")
    config._attn_implementation = "sdpa"
    return config


def _model_class(model_type: str):
    from transformers import BertForMaskedLM, ModernBertForMaskedLM, RobertaForMaskedLM

    return {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "modernbert": ModernBertForMaskedLM}[
        model_type
    ]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
