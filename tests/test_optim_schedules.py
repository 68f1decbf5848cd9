"""LR multipliers: hand-computed values and agreement with transformers' schedules."""
import math

import pytest
import torch

from minbert.optim import lr_lambda


def test_hand_computed_values():
    constant = lr_lambda("constant", warmup_steps=4)
    assert [constant(s) for s in (0, 1, 2, 4, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert lr_lambda("constant")(0) == 1.0  # no warm-up

    linear = lr_lambda("linear", warmup_steps=2, total_steps=10)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0, 12: 0.0}  # decay (10 - s) / 8 after warm-up
    assert {s: linear(s) for s in expected} == pytest.approx(expected)

    cosine = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: (1 + math.cos(math.pi / 4)) / 2, 6: 0.5, 10: 0.0, 15: 0.0}
    assert {s: cosine(s) for s in expected} == pytest.approx(expected)


def test_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for warmup, total in [(0, 17), (5, 50), (3, 4)]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        for ours, theirs in [
            (lr_lambda("linear", warmup, total), transformers.get_linear_schedule_with_warmup(opt, warmup, total)),
            (lr_lambda("cosine", warmup, total), transformers.get_cosine_schedule_with_warmup(opt, warmup, total)),
            (lr_lambda("constant", warmup), transformers.get_constant_schedule_with_warmup(opt, warmup)),
        ]:
            for step in range(total + 1):
                assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), (warmup, total, step)


def test_no_decay_phase_ends_at_zero():
    for kind in ("linear", "cosine"):
        schedule = lr_lambda(kind, warmup_steps=10, total_steps=10)
        assert (schedule(5), schedule(10), schedule(11)) == (0.5, 0.0, 0.0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        lr_lambda("step", 0, 10)
    with pytest.raises(ValueError):
        lr_lambda("linear", 5)  # decay needs total_steps
