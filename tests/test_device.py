"""Everything a training step and an evaluation touch lives on the device the loop is told to use.

This machine has no GPU, so the device is `meta`: a CPU tensor cannot meet a meta one in an op, just
as a CPU tensor cannot meet a CUDA one, so a batch, mask, loss or counter left on the CPU fails here
the way it would fail at step 1 on a GPU.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from mlm_pretrain.batches import MLMBatches, evaluation_batches
from mlm_pretrain.corpus import TextStream
from mlm_pretrain.models import build_model
from mlm_pretrain.objectives.mlm import SparseMLM
from mlm_pretrain.packing import BlockStream, TokenInfo
from mlm_pretrain.schema import MaskingRecipe, ModelRecipe
from mlm_pretrain.tokenizer import load_tokenizer
from mlm_pretrain.trainer import forward_backward, score_micro_batches

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "tokenizers/default-wordpiece-8k")


def batches_on(device, tokenizer, accumulation=2):
    stream = BlockStream(TextStream(["@sample"], seed=0), tokenizer, 32, shuffle_buffer=16, seed=0)
    info = TokenInfo(tokenizer)
    return MLMBatches(
        stream, info, MaskingRecipe(), seed=0, micro_batch_size=4, accumulation=accumulation, device=device
    )


def test_a_training_step_and_an_evaluation_run_wholly_on_the_loops_device(tokenizer):
    with META:
        model = build_model(
            ModelRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, 32
        )
    objective = SparseMLM(model)
    optimizer = torch.optim.AdamW(objective.parameters())  # fused AdamW has no meta kernel
    accelerator = Accelerator(cpu=True)

    step = next(batches_on(META, tokenizer))
    assert len(step.micro_batches) == 2 and step.masked.device == META
    for micro in step.micro_batches:
        assert {t.device for t in vars(micro).values() if t is not None} == {META}
    loss_sum, masked = forward_backward(objective, step, accelerator)
    assert loss_sum.device == META and masked.device == META
    assert all(p.grad.device == META for p in objective.parameters())
    optimizer.step()  # (deciding whether to apply an update reads the loss on the host: not on meta)

    stream = BlockStream(TextStream(["@sample-validation"], shuffle_files=False), tokenizer, 32)
    evaluation = evaluation_batches(
        stream, TokenInfo(tokenizer), MaskingRecipe(), micro_batch_size=4, max_blocks=8, device=META
    )
    assert score_micro_batches(objective, evaluation, accelerator).device == META

    # the check has teeth: the same step built on the CPU cannot meet the model on its device
    cpu_step = next(batches_on(torch.device("cpu"), tokenizer))
    with pytest.raises((RuntimeError, NotImplementedError)):
        forward_backward(objective, cpu_step, accelerator)


def test_batches_resume_exactly_and_mask_the_same_on_any_device(tokenizer):
    straight = batches_on("cpu", tokenizer)
    steps = [next(straight) for _ in range(5)]
    resumed = batches_on("cpu", tokenizer)
    for _ in range(2):
        next(resumed)
    state = resumed.state_dict()
    fresh = batches_on("cpu", tokenizer)
    fresh.load_state_dict(state)
    for expected in steps[2:]:
        got = next(fresh)
        for a, b in zip(expected.micro_batches, got.micro_batches, strict=True):
            for key, x in vars(a).items():
                y = getattr(b, key)
                assert x is y is None or torch.equal(x, y)
    meta_step = next(batches_on(META, tokenizer))
    assert [m.labels.shape for m in meta_step.micro_batches] == [
        m.labels.shape for m in steps[0].micro_batches
    ]


@pytest.mark.parametrize("model_type", ["bert", "modernbert"])
def test_bf16_on_the_cpu_trains_with_explicit_attention_that_scores_as_sdpa_does(tokenizer, model_type):
    from mlm_pretrain.parallel import parallelize
    from mlm_pretrain.schema import ImplRecipe

    torch.manual_seed(0)
    recipe = ModelRecipe(type=model_type, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    objective = SparseMLM(build_model(recipe, tokenizer, 32))
    step = next(batches_on(torch.device("cpu"), tokenizer, accumulation=1))

    def loss_with(precision: str) -> float:
        # what parallelize reads of an Accelerator (whose state is one per process, fixed by the first)
        accelerator = SimpleNamespace(
            device=torch.device("cpu"), mixed_precision=precision, prepare_model=lambda m: m
        )
        trained = parallelize(objective, ImplRecipe(), accelerator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return float(trained(**vars(step.micro_batches[0]))[0])

    fp32 = loss_with("no")
    assert objective.model.config._attn_implementation == "sdpa"
    bf16 = loss_with("bf16")
    assert objective.model.config._attn_implementation == "eager"
    assert bf16 == pytest.approx(fp32, rel=2e-2)
