"""Replaced-token detection (objectives/electra.py): a tiny generator and discriminator on the shipped
sample corpus, the module alone, then `mlm-pretrain pretrain objective=electra` end to end (one process,
DDP and FSDP over 2, a killed run resumed)."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_parallel import torchrun
from test_trainer import ROOT, TINY, pretrain, records

from mlm_pretrain.batches import training_batches
from mlm_pretrain.checkpoint import latest_checkpoint
from mlm_pretrain.errors import InputError
from mlm_pretrain.objectives import build_objective
from mlm_pretrain.objectives.electra import generator_recipe, sampling_uniforms
from mlm_pretrain.packing import TokenInfo
from mlm_pretrain.parallel import full_state_dict
from mlm_pretrain.schema import (
    DataRecipe,
    ElectraRecipe,
    MaskingRecipe,
    ModelRecipe,
    OptimRecipe,
    PretrainRecipe,
)
from mlm_pretrain.tokenizer import load_tokenizer
from mlm_pretrain.trainer import binary_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

ELECTRA = ["objective=electra", "mlm.mask_token_ratio=1.0", "mlm.random_token_ratio=0.0"]


def tiny_recipe(model_type: str = "modernbert", micro_batch_size: int = 8) -> PretrainRecipe:
    return PretrainRecipe(
        objective="electra",
        max_steps=100,
        data=DataRecipe(seq_len=32, tokenizer=str(ROOT / "tokenizers/default-wordpiece-8k")),
        model=ModelRecipe(type=model_type, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        mlm=MaskingRecipe(mask_token_ratio=1.0, random_token_ratio=0.0),
        optim=OptimRecipe(batch_size=8, micro_batch_size=micro_batch_size),
        electra=ElectraRecipe(generator_size=0.25),
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "tokenizers/default-wordpiece-8k")


def built(recipe: PretrainRecipe, tokenizer):
    torch.manual_seed(0)
    return build_objective(recipe, tokenizer, compile=False)


def steps(recipe: PretrainRecipe, tokenizer):
    return training_batches(recipe, tokenizer, TokenInfo(tokenizer), device="cpu", rank=0, world_size=1)


def train_loss(objective, micro) -> torch.Tensor:
    return objective(
        micro.input_ids, micro.attention_mask, micro.positions, micro.labels, count_correct=False
    )[0]


def test_the_generator_is_a_quarter_as_wide_and_shares_the_token_embeddings(tokenizer):
    objective = built(tiny_recipe(), tokenizer)
    generator = objective.generator.config
    assert (generator.hidden_size, generator.intermediate_size, generator.num_attention_heads) == (16, 32, 1)
    assert generator.num_hidden_layers == 2 and generator.model_type == "modernbert"
    table = objective.discriminator.get_input_embeddings().weight
    # one vocabulary table in all: the generator's is the discriminator's, projected to 16 wide
    assert [p.shape for p in objective.parameters() if len(tokenizer) in p.shape] == [
        table.shape,
        (len(tokenizer),),
    ]
    with pytest.raises(
        InputError, match="electra.generator_size 0.3 gives the generator a hidden size of 19"
    ):
        generator_recipe(objective.discriminator.config, ModelRecipe(), ElectraRecipe(generator_size=0.3))


def test_the_loss_is_finite_and_falls(tokenizer):
    recipe = tiny_recipe()
    objective = built(recipe, tokenizer)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for step in steps(recipe, tokenizer):
        (micro,) = step.micro_batches
        loss = train_loss(objective, micro) / step.masked
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if len(losses) == 40:
            break
    assert all(torch.isfinite(torch.tensor(losses)))
    # generator cross-entropy ~9 + 50 x detection ~0.69 at the start
    assert 35 < losses[0] < 55 and sum(losses[-10:]) / 10 < losses[0] - 5


def test_the_discriminator_learns_at_every_position_the_generator_at_the_masked_only(tokenizer):
    recipe = tiny_recipe()
    objective = built(recipe, tokenizer)
    (micro,) = next(steps(recipe, tokenizer)).micro_batches
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.last_hidden_state.retain_grad()
            outputs[name] = output.last_hidden_state

        return hook

    objective.discriminator.register_forward_hook(keep("discriminator"))
    objective.generator.base_model.register_forward_hook(keep("generator"))
    train_loss(objective, micro).backward()
    masked = torch.zeros(micro.input_ids.numel(), dtype=torch.bool)
    masked[micro.positions] = True
    for name, reached in (("discriminator", ~masked), ("generator", masked)):
        touched = outputs[name].grad.flatten(0, 1).abs().sum(-1) > 0
        assert touched[reached].all(), name
    # the generator's head reads the masked positions only (sparse), the discriminator's every one
    assert not touched[~masked].any()
    assert (~masked).sum() > 4 * masked.sum()


def test_the_gradient_is_the_same_in_one_micro_batch_or_two(tokenizer):
    recipe = tiny_recipe()
    objective = built(recipe, tokenizer)
    step = next(steps(recipe, tokenizer))
    (whole,) = step.micro_batches
    (train_loss(objective, whole) / step.masked).backward()
    one = [p.grad.clone() for p in objective.parameters()]
    objective.zero_grad()

    split = next(steps(tiny_recipe(micro_batch_size=4), tokenizer))  # the same global batch, cut in two
    assert torch.equal(torch.cat([m.input_ids for m in split.micro_batches]), whole.input_ids)
    for micro in split.micro_batches:
        (train_loss(objective, micro) / split.masked).backward()
    for a, (name, p) in zip(one, objective.named_parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7), name
    # the sampling noise of a block does not depend on what it is batched with
    first = split.micro_batches[0]
    in_whole = whole.positions[whole.positions < first.input_ids.numel()]
    assert torch.equal(
        sampling_uniforms(whole.input_ids, in_whole), sampling_uniforms(first.input_ids, first.positions)
    )


@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert"])
def test_the_export_is_a_standard_encoder_and_a_fill_mask_generator(model_type, tokenizer, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

    recipe = tiny_recipe(model_type)
    objective = built(recipe, tokenizer)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    (micro,) = next(steps(recipe, tokenizer)).micro_batches
    train_loss(objective, micro).backward()  # trained weights, so that nothing matches by initialisation
    optimizer.step()
    objective.export(tmp_path, full_state_dict(objective), tokenizer)
    assert (tmp_path / "model.safetensors").exists() and (
        tmp_path / "generator" / "model.safetensors"
    ).exists()

    objective.eval()
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert info["missing_keys"] <= {"pooler.dense.weight", "pooler.dense.bias"}  # BertModel's default pooler
    classifier, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and all(
        "classifier" in k or "pooler" in k or "head" in k for k in info["missing_keys"]
    )
    generator, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "generator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ids = micro.input_ids[:2]
        assert torch.allclose(
            encoder(input_ids=ids).last_hidden_state,
            objective.discriminator(input_ids=ids).last_hidden_state,
            atol=1e-5,
        )
        assert torch.allclose(
            generator(input_ids=ids).logits, objective.generator(input_ids=ids).logits, atol=1e-5
        )
    fill_mask = pipeline("fill-mask", model=str(tmp_path / "generator"))
    guesses = fill_mask(
        f"it is a truth universally {tokenizer.mask_token}.", tokenizer_kwargs={"truncation": True}
    )
    assert len(guesses) == 5 and all(0 <= g["score"] <= 1 for g in guesses)


def test_evaluation_reports_the_generators_mlm_scores_and_the_discriminators_apart(tokenizer):
    recipe = tiny_recipe()
    objective = built(recipe, tokenizer).eval()
    (micro,) = next(steps(recipe, tokenizer)).micro_batches
    with torch.no_grad():
        loss, correct = objective(micro.input_ids, micro.attention_mask, micro.positions, micro.labels)
        detection, right, real, replaced = objective.discriminator_scores(
            micro.input_ids, micro.attention_mask, micro.positions, micro.labels
        ).tolist()
    masked = len(micro.labels)
    assert 8 < float(loss) / masked < 10 and 0 <= int(correct) <= masked  # ~ln(8192) before training
    assert real == micro.input_ids.numel() and 0 < replaced <= masked
    assert 0.6 < detection / real < 0.8 and 0 <= right <= real


def test_the_detection_baseline_is_the_loss_of_always_answering_the_replaced_fraction():
    replaced = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    fraction = replaced.mean()
    constant = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.full_like(replaced, float(torch.logit(fraction))), replaced
    )
    assert binary_entropy(float(fraction)) == pytest.approx(float(constant))
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0


def test_sharded_by_fsdp_it_scores_and_exports_as_the_whole_module_does(
    tokenizer, tmp_path, one_process_group
):
    """FSDP2 over one process (gloo): the shared table in one group with both embeddings and the
    generator's head, `discriminator_scores` gathering its weights as `forward` does, the export from
    the gathered state the same as from the module itself."""
    from types import SimpleNamespace

    from mlm_pretrain.parallel import is_sharded, parallelize
    from mlm_pretrain.schema import ImplRecipe

    recipe = tiny_recipe()
    whole, sharded = built(recipe, tokenizer), built(recipe, tokenizer)
    (micro,) = next(steps(recipe, tokenizer)).micro_batches
    args = (micro.input_ids, micro.attention_mask, micro.positions, micro.labels)
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    sharded = parallelize(sharded, ImplRecipe(parallel="fsdp"), accelerator)
    assert is_sharded(sharded)
    train_loss(sharded, micro).backward()  # every parameter in some group, gathered when used
    assert all(p.grad is not None for p in sharded.parameters())
    with torch.no_grad():
        assert torch.allclose(sharded.discriminator_scores(*args), whole.discriminator_scores(*args))
    state = full_state_dict(sharded)
    whole_state = full_state_dict(whole)
    assert state.keys() == whole_state.keys()
    sharded.export(tmp_path / "sharded", state, tokenizer)
    whole.export(tmp_path / "whole", whole_state, tokenizer)
    for part in ("model.safetensors", "generator/model.safetensors"):
        a, b = load_file(tmp_path / "sharded" / part), load_file(tmp_path / "whole" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow
def test_compiled_scoring_computes_what_eager_does(tokenizer):
    recipe = tiny_recipe()
    eager = built(recipe, tokenizer)
    torch.manual_seed(0)
    compiled = build_objective(recipe, tokenizer, compile=True)
    (micro,) = next(steps(recipe, tokenizer)).micro_batches
    assert float(train_loss(compiled, micro)) == pytest.approx(float(train_loss(eager, micro)), rel=1e-4)


def test_the_electra_group_is_for_objective_electra_only(tmp_path):
    refused = pretrain(tmp_path, "--max-steps", "2", "electra.discriminator_weight=10", check=False)
    assert refused.returncode == 2 and "electra applies to objective electra only" in refused.stderr


# -- end to end ---------------------------------------------------------------------------------------

PLAN = ["--max-steps", "12", "save_every=4", "eval_every=6", "keep_last=3", *ELECTRA]


@pytest.mark.slow
def test_an_electra_run_learns_exports_and_a_killed_one_resumes_bit_identical(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    straight = tmp_path / "straight"
    pretrain(straight, *PLAN)
    losses = [loss for _, loss in records(straight, "loss")]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert [s for s, _ in records(straight, "eval_loss")] == [6, 12]
    # the discriminator's scores are logged beside the generator's: calls on every real token
    replaced = dict(records(straight, "eval_replaced_fraction"))
    assert 0 < replaced[12] < 0.15  # of the 15% masked, the generator guesses some right
    assert 0 < dict(records(straight, "eval_detection_accuracy"))[12] <= 1
    baseline = dict(records(straight, "eval_detection_baseline_loss"))[12]
    assert baseline == pytest.approx(binary_entropy(replaced[12]))
    _, info = AutoModelForSequenceClassification.from_pretrained(straight / "final", output_loading_info=True)
    assert info["missing_keys"] == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    _, info = AutoModelForMaskedLM.from_pretrained(straight / "final" / "generator", output_loading_info=True)
    assert not info["missing_keys"]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlm_pretrain", "pretrain", *TINY, "--out", str(killed), *PLAN]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name[5:]) < 12

    result = pretrain(killed, *PLAN, "--resume")
    assert f"resumed from {resumed_from}" in result.stderr
    for part in ("model.safetensors", "generator/model.safetensors"):
        a, b = load_file(straight / "final" / part), load_file(killed / "final" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert records(straight, "loss") == records(killed, "loss")


@pytest.mark.slow
def test_electra_trains_the_same_in_one_process_and_two_under_ddp_and_fsdp(tmp_path):
    plan = ["--max-steps", "8", "save_every=4", "eval_every=100", *ELECTRA]
    runs = {}
    for name, launcher, micro in (
        ("one", (sys.executable, "-m", "mlm_pretrain"), 8),
        ("ddp", torchrun(2), 4),
        ("fsdp", torchrun(2), 4),
    ):
        runs[name] = tmp_path / name
        pretrain(
            runs[name],
            *plan,
            f"optim.micro_batch_size={micro}",
            f"parallel={name if name != 'one' else 'ddp'}",
            launcher=launcher,
        )
    for name in ("ddp", "fsdp"):
        for (step, a), (_, b) in zip(records(runs["one"], "loss"), records(runs[name], "loss"), strict=True):
            assert a == pytest.approx(b, rel=1e-4), (name, step)
        assert records(runs["one"], "eval_loss")[0][1] == pytest.approx(
            records(runs[name], "eval_loss")[0][1], rel=1e-4
        )
    for part in ("model.safetensors", "generator/model.safetensors"):
        a, b = load_file(runs["ddp"] / "final" / part), load_file(runs["fsdp"] / "final" / part)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), part
