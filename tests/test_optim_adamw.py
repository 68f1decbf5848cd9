"""AdamW matches torch.optim.AdamW step for step; state_dict round-trips; weight-decay grouping."""
import copy

import torch
from torch import nn

from minbert.optim import AdamW, lr_lambda, param_groups_for_weight_decay

SHAPES = [(4, 3), (3,), (2, 5, 2), (6,), (1, 1)]
STEPS = 20


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _groups(params: list[nn.Parameter]) -> list[dict]:
    return [
        {"params": params[:3], "weight_decay": 0.1},
        {"params": params[3:], "weight_decay": 0.0, "lr": 5e-2},
    ]


def _grads(step: int) -> list[torch.Tensor | None]:
    """Deterministic grads; param 1 has no grad on even steps, param 4 only from step 7 on."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    if step % 2 == 0:
        grads[1] = None
    if step < 7:
        grads[4] = None
    return grads


def _run(opt, sched, params, steps):
    for step in steps:
        for p, g in zip(params, _grads(step)):
            p.grad = None if g is None else g.clone()
        opt.step()
        sched.step()


def test_matches_torch_adamw_step_for_step():
    ours_p, ref_p = _params(), _params()
    ours = AdamW(_groups(ours_p), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    ref = torch.optim.AdamW(_groups(ref_p), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    ours_s = torch.optim.lr_scheduler.LambdaLR(ours, lr_lambda("linear", 5, STEPS))
    ref_s = torch.optim.lr_scheduler.LambdaLR(ref, lr_lambda("linear", 5, STEPS))
    for step in range(STEPS):
        _run(ours, ours_s, ours_p, [step])
        _run(ref, ref_s, ref_p, [step])
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ours.state[ours_p[1]]["step"].item() == STEPS // 2  # skipped params do not advance
    assert ours.state[ours_p[4]]["step"].item() == STEPS - 7
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]


def test_state_dict_round_trip_continues_identically():
    params = _params()
    opt = AdamW(_groups(params), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 3, STEPS))
    _run(opt, sched, params, range(10))
    saved_params = copy.deepcopy([p.detach() for p in params])
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    assert set(saved_opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    _run(opt, sched, params, range(10, STEPS))

    resumed = [nn.Parameter(t.clone()) for t in saved_params]
    opt2 = AdamW(_groups(resumed), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda("cosine", 3, STEPS))
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    _run(opt2, sched2, resumed, range(10, STEPS))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state():
    ref_p = _params()
    ref = torch.optim.AdamW(_groups(ref_p), lr=1e-2, foreach=False)
    ref_s = torch.optim.lr_scheduler.LambdaLR(ref, lr_lambda("constant", 2))
    _run(ref, ref_s, ref_p, range(5))
    ours_p = [nn.Parameter(p.detach().clone()) for p in ref_p]
    ours = AdamW(_groups(ours_p), lr=1e-2)
    ours_s = torch.optim.lr_scheduler.LambdaLR(ours, lr_lambda("constant", 2))  # before loading: it resets lr
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # load_state_dict may alias tensors
    ours_s.load_state_dict(ref_s.state_dict())
    _run(ref, ref_s, ref_p, range(5, 10))
    _run(ours, ours_s, ours_p, range(5, 10))
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_param_groups_for_weight_decay():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.dense = nn.Linear(4, 4)
            self.LayerNorm = nn.LayerNorm(4)
            self.out_norm = nn.Linear(4, 4, bias=False)  # 2-D but named *norm*: exempt by name
            self.frozen = nn.Linear(4, 2)
            self.frozen.requires_grad_(False)

    model = Tiny()
    decay, no_decay = param_groups_for_weight_decay(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.embed.weight), id(model.dense.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model.dense.bias), id(model.LayerNorm.weight), id(model.LayerNorm.bias), id(model.out_norm.weight)
    }
    AdamW([decay, no_decay], lr=1e-3)  # usable as-is
