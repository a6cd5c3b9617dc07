"""Build BERT, RoBERTa or ModernBERT masked-LM models from `transformers` configs, sized by the recipe.

Vocabulary size and special-token ids come from the tokenizer; a recipe that states a different
vocabulary size is an error, not a silent resize. `portable_config` makes a saved config.json one that
transformers 4.x reads as the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import torch

from mlm_pretrain.errors import InputError
from mlm_pretrain.schema import ModelRecipe, ModelType


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
        if (positions := usable_positions(model.config)) < seq_len:
            raise InputError(
                f"{recipe.init_from}: config.json gives {positions} positions, shorter than data.seq_len "
                f"{seq_len}; pretrain the first phase with model.max_position_embeddings={seq_len}"
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
        raise InputError(f"unknown model.type {recipe.type!r}; valid: {', '.join(get_args(ModelType))}")
    config._attn_implementation = "sdpa"
    return config


def _model_class(model_type: str):
    from transformers import BertForMaskedLM, ModernBertForMaskedLM, RobertaForMaskedLM

    return {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "modernbert": ModernBertForMaskedLM}[
        model_type
    ]


def usable_positions(config) -> int:
    """The longest input the model takes: `max_position_embeddings`, less RoBERTa's offset. RoBERTa numbers
    positions from pad_token_id + 1, and `_config` gives it two more rows than the sequence length (as
    roberta-base's 514 for 512); a pad id above 1 would push positions past the table sooner."""
    if config.model_type == "roberta":
        return config.max_position_embeddings - max(2, config.pad_token_id + 1)
    return config.max_position_embeddings


def portable_config(config: dict) -> dict:
    """config.json as transformers 5 writes it, plus what transformers 4.x needs to build the same model.

    transformers 5 describes ModernBERT's attention layers by `layer_types` and `rope_parameters`; 4.x
    reads neither and would silently fall back to its defaults for the pattern of global layers and both
    RoPE bases. The keys 4.x reads are added beside them (5 reads its own and ignores these).
    """
    if config.get("model_type") != "modernbert" or "layer_types" not in config:
        return config
    layers = config["layer_types"]
    full = [i for i, kind in enumerate(layers) if kind == "full_attention"]
    every = full[1] if len(full) > 1 else len(layers)
    if [("full_attention" if i % every == 0 else "sliding_attention") for i in range(len(layers))] != layers:
        raise InputError(
            f"config.json: layer_types {layers} is not one global layer every n, which is all transformers "
            "4.x can describe"
        )
    rope = config["rope_parameters"]
    return {
        **config,
        "global_attn_every_n_layers": every,
        "global_rope_theta": rope["full_attention"]["rope_theta"],
        "local_rope_theta": rope["sliding_attention"]["rope_theta"],
    }


def make_config_portable(directory: Path) -> None:
    """Rewrite the config.json `save_pretrained` wrote in `directory` as `portable_config` makes it."""
    file = Path(directory) / "config.json"
    file.write_text(
        json.dumps(portable_config(json.loads(file.read_text())), indent=2, sort_keys=True) + "\n"
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
