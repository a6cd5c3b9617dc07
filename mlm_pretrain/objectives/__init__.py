"""Pretraining objectives: what a batch of text is turned into and what the model learns from it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the package is imported by commands that never need torch
    import torch


def build_objective(recipe, tokenizer, compile: bool) -> torch.nn.Module:
    """The module a torch objective of `recipe` (a `schema.PretrainRecipe`) trains, freshly built (or
    from `model.init_from`): `SparseMLM` for mlm, `ReplacedTokenDetection` for electra. Its forward
    returns (summed loss, correct count); it has `encoders()` (its Hugging Face models, for
    `parallelize`) and `export(directory, state, tokenizer)`. `compile` compiles the scoring heads."""
    from mlm_pretrain.models import build_model

    model = build_model(recipe.model, tokenizer, recipe.data.seq_len)
    if recipe.objective == "electra":
        from mlm_pretrain.objectives.electra import ReplacedTokenDetection, generator_recipe

        shape = generator_recipe(model.config, recipe.model, recipe.electra)
        return ReplacedTokenDetection(
            model,
            build_model(shape, tokenizer, recipe.data.seq_len),
            discriminator_weight=recipe.electra.discriminator_weight,
            mask_rate=recipe.mlm.mask_rate,
            compile_head=compile,
        )
    from mlm_pretrain.objectives.mlm import SparseMLM

    return SparseMLM(model, compile_head=compile)
