import pytest
import torch

from mlm_pretrain.optim import build_optimizer, lr_factor


def test_schedules_warm_up_then_decay_to_zero():
    for schedule in ("linear", "cosine", "wsd"):
        curve = [lr_factor(p / 100, schedule, warmup=0.1) for p in range(101)]
        assert curve[0] == 0 and curve[5] == pytest.approx(0.5) and curve[10] == pytest.approx(1.0)
        assert curve[-1] == pytest.approx(0.0, abs=1e-9)
        assert all(a >= b - 1e-12 for a, b in zip(curve[10:], curve[11:], strict=False))
    assert lr_factor(0.55, "linear", 0.1) == pytest.approx(0.5)
    assert lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_factor(0.7, "wsd", 0.1, decay=0.2) == 1.0 and lr_factor(
        0.9, "wsd", 0.1, decay=0.2
    ) == pytest.approx(0.5)
    assert lr_factor(0.9, "constant", 0.1) == 1.0


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(10, 4))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.shape for p in decayed["params"]} == {torch.Size([4, 4]), torch.Size([10, 4])}
    assert len(plain["params"]) == 3  # linear bias, norm weight and bias


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(0.5, "step", 0.1)
