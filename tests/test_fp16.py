"""fp16 autocast with loss scaling (both run on the CPU): the --amp choice, the scaler, gradients against float32
for summed losses, PCGrad, GradNorm and SMART, skipped steps, the stop after 20 skips, and resume."""
import copy
import json

import pytest
import torch

import minbert.runtime
import minbert.training.train as train
from minbert.heads import MultitaskBert
from minbert.optim import MAX_SKIPPED_IN_A_ROW, LossScaler, NonFiniteLoss
from test_train import assert_same_weights, exits, one_batch_per_task, run_args, weights
from minbert.training.config import TrainConfig, parse_args
from minbert.training.step import MethodState, Runtime, train_step

CPU = torch.device("cpu")


def test_amp_auto_picks_bf16_fp16_or_float32_by_device(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(minbert.runtime, "bf16_supported", lambda device: True)  # an A100 / H100
    assert minbert.runtime.resolve_precision(cuda, "auto") == "bf16"
    monkeypatch.setattr(minbert.runtime, "bf16_supported", lambda device: False)  # a T4 / V100
    assert minbert.runtime.resolve_precision(cuda, "auto") == "fp16"
    assert minbert.runtime.resolve_precision(CPU, "auto") == "fp32"
    assert [minbert.runtime.resolve_precision(cuda, a) for a in ("bf16", "fp16", "off")] == ["bf16", "fp16", "fp32"]
    assert [parse_args(a).run.amp for a in ([], ["--amp"], ["--no-amp"], ["--amp", "fp16"])] == \
        ["auto", "bf16", "off", "fp16"]


def test_loss_scaler_backs_off_grows_and_round_trips():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    (scaler.scale(p.sum())).backward()
    found_inf = torch.zeros(1)
    scaler.unscale_([p], found_inf)
    assert torch.equal(p.grad, torch.ones(3)) and found_inf.item() == 0
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    scaler.unscale_([p], found_inf)
    assert found_inf.item() == 1
    scaler.update(skipped=True)
    assert scaler.scale_value == 4.0 and scaler.skipped == scaler.skipped_in_a_row == 1
    scaler.update(skipped=False)
    scaler.update(skipped=False)
    assert scaler.scale_value == 8.0 and scaler.skipped_in_a_row == 0 and scaler.skipped == 1
    restored = LossScaler()
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert restored.state_dict() == scaler.state_dict()
    off = LossScaler(enabled=False)
    loss = torch.tensor(2.0)
    assert off.scale(loss) is loss and off.scale_value == 1.0


METHODS = {"summed": {}, "pcgrad": {"pcgrad": True}, "gradnorm": {"gradnorm": True},
           "smart": {"smart": True, "smart_steps": 1, "smart_noise": 0.0},
           # the Gram matrix, Nash-MTL's scale-free solve and FAMO's loss-dependent weights must see scale 1
           "mgda": {"aggregator": "mgda", "mgda_normalization": "l2"}, "nash_mtl": {"aggregator": "nash_mtl"},
           "cagrad": {"aggregator": "cagrad"}, "famo": {"loss_weighting": "famo"},
           "uw + upgrad": {"loss_weighting": "uw", "aggregator": "upgrad"}}


def gradients_after_one_step(tiny_model_dir, flags: dict, precision: str, scale: float) -> dict:
    """Every parameter's gradient after train_step (no update: SGD at lr 0), with the loss scaler at `scale`."""
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir)).eval()  # no dropout: every run computes one function
    cfg = TrainConfig.from_flags(**flags)
    state = MethodState.create(model, cfg, "fp16")
    state.scaler.scale_value = scale
    batches = one_batch_per_task(model)
    torch.manual_seed(5)
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), {t: iter([b]) for t, b in
                                                                             batches.items()}, list(batches), cfg,
                        state, Runtime(CPU, precision))
    assert result.stepped
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"grads": grads, "gradnorm": state.gradnorm and state.gradnorm.weights}


@pytest.mark.parametrize("method", list(METHODS))
def test_scaled_step_equals_the_unscaled_one_and_fp16_is_close_to_float32(tiny_model_dir, method):
    # float32 arithmetic: scaling by 2^16 and back is exact, so the step must not depend on the scale at all,
    # which holds only if every task's gradient is unscaled before PCGrad, GradNorm and SMART see it
    one = gradients_after_one_step(tiny_model_dir, METHODS[method], "fp32", 1.0)
    big = gradients_after_one_step(tiny_model_dir, METHODS[method], "fp32", 2.0 ** 16)
    assert one["grads"].keys() == big["grads"].keys()
    for name in one["grads"]:
        torch.testing.assert_close(big["grads"][name], one["grads"][name], rtol=1e-5, atol=1e-7, msg=name)
    if method == "gradnorm":
        torch.testing.assert_close(big["gradnorm"], one["gradnorm"])
        assert not torch.equal(one["gradnorm"], torch.ones(3))  # the weights did move
    # fp16 autocast with the scale at 2^16: the same gradients up to fp16 rounding
    half = gradients_after_one_step(tiny_model_dir, METHODS[method], "fp16", 2.0 ** 16)
    flat = lambda g: torch.cat([g["grads"][n].flatten() for n in sorted(one["grads"])])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(half), flat(one), dim=0) > 0.999
    assert not torch.equal(flat(half), flat(one))  # fp16 did run


class InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("flags", [{}, {"pcgrad": True}, {"gradnorm": True}, {"smart": True, "smart_bregman": 0.5},
                                   {"aggregator": "gradvac"}, {"loss_weighting": "uw"}, {"loss_weighting": "famo"}])
def test_inf_in_one_task_skips_the_step_for_all_and_lowers_the_scale(tiny_model_dir, monkeypatch, flags):
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir))
    cfg = TrainConfig.from_flags(**flags)
    state = MethodState.create(model, cfg, "fp16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    batches = one_batch_per_task(model)
    streams = lambda: {t: iter([b]) for t, b in batches.items()}  # noqa: E731
    rt = Runtime(CPU, "fp16")
    # a step that is taken first (moments exist then); at the initial scale 2^16 a step may overflow and be skipped
    assert any(train_step(model, optimizer, streams(), list(batches), cfg, state, rt).stepped for _ in range(4))
    lr_sched.step()
    scale, skipped = state.scaler.scale_value, state.scaler.skipped
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), lr_sched.last_epoch,
              state.gradnorm and state.gradnorm.weights,
              {k: copy.deepcopy(m.state_dict()) for k, m in state.stateful()})
    real_loss = train.train_step.__globals__["task_loss"]
    monkeypatch.setitem(train.train_step.__globals__, "task_loss", lambda model, task, *a: InfGrad.apply(
        real_loss(model, task, *a)) if task == "para" else real_loss(model, task, *a))
    result = train_step(model, optimizer, streams(), list(batches), cfg, state, rt)
    assert not result.stepped and all(map(torch.isfinite, map(torch.tensor, result.losses.values())))
    assert state.scaler.scale_value == scale / 2 and state.scaler.skipped == skipped + 1
    assert_same_weights(before[0], model.state_dict())
    assert json.dumps(str(optimizer.state_dict())) == json.dumps(str(before[1]))
    assert lr_sched.last_epoch == before[2]  # the loop steps the schedule only after a real step
    if state.gradnorm:
        assert torch.equal(state.gradnorm.weights, before[3])
    for prefix, method in state.stateful():  # the EMA teacher, GradVac's targets, UW's scales, FAMO's logits
        assert_same_weights(before[4][prefix], method.state_dict())
    assert all(p.grad is None for p in model.parameters())


def test_twenty_skips_in_a_row_stop_the_run_and_float32_stops_at_once(tiny_model_dir, monkeypatch):
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(str(tiny_model_dir))
    batches = one_batch_per_task(model)
    real_loss = train.train_step.__globals__["task_loss"]
    monkeypatch.setitem(train.train_step.__globals__, "task_loss",
                        lambda *a: real_loss(*a) * float("inf"))  # an overflowing loss
    cfg = TrainConfig()
    state = MethodState.create(model, cfg, "fp16")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        assert not train_step(model, optimizer, {t: iter([b]) for t, b in batches.items()}, list(batches), cfg,
                              state, Runtime(CPU, "fp16")).stepped
    with pytest.raises(NonFiniteLoss, match="20 steps in a row were skipped under fp16 \\(the sst loss is inf"):
        train_step(model, optimizer, {t: iter([b]) for t, b in batches.items()}, list(batches), cfg, state,
                   Runtime(CPU, "fp16"))
    with pytest.raises(NonFiniteLoss, match="the sst loss is inf"):
        train_step(model, optimizer, {t: iter([b]) for t, b in batches.items()}, list(batches), cfg,
                   MethodState.create(model, cfg, "fp32"), Runtime(CPU, "fp32"))


def test_fp16_run_resumes_bit_identical_with_its_loss_scale(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                            capsys):
    real_loss, calls = train.train_step.__globals__["task_loss"], {"n": 0}

    def overflow_once(model, task, *a):  # one overflowing loss in step 2: that step is skipped, the scale halves
        calls["n"] += 1
        loss = real_loss(model, task, *a)
        return loss * float("inf") if calls["n"] == 4 else loss
    monkeypatch.setitem(train.train_step.__globals__, "task_loss", overflow_once)
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "a", "--amp", "fp16", "--save_every", "2"))
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == 1 and record["loss_scale"] == 2.0 ** 15
    assert "device cpu (fp16 autocast, gradient scaling)" in (tmp_path / "a" / "run.log").read_text()

    calls["n"] = 0
    real_step, steps = train.train_step, {"n": 0}

    def dies_at_step_5(*a, **kw):
        steps["n"] += 1
        if steps["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **kw)
    monkeypatch.setattr(train, "train_step", dies_at_step_5)
    args = run_args(tiny_model_dir, tiny_data_dir, tmp_path / "b", "--amp", "fp16", "--save_every", "2")
    exits(capsys, 130, "interrupted", train.main, args)
    monkeypatch.setattr(train, "train_step", real_step)
    state = json.loads((tmp_path / "b" / "last" / "train_state.json").read_text())
    assert state["loss_scaler"]["scale"] == 2.0 ** 15 and state["loss_scaler"]["skipped"] == 1
    train.main(args + ["--resume"])
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_masked_lm_and_evaluation_run_under_fp16(tiny_model_dir, tiny_data_dir, tmp_path):
    import minbert.training.evaluate as evaluate
    record = train.main(["--option", "mlm", "--model", str(tiny_model_dir), "--data_dir", str(tiny_data_dir),
                         "--output_dir", str(tmp_path / "mlm"), "--epochs", "1", "--batch_size", "8", "--lr", "3e-3",
                         "--amp", "fp16"])
    # the first steps may overflow at the initial scale 2^16: each skip halves it (no growth within 30 steps)
    assert record["skipped_steps"] <= 5 and record["loss_scale"] == 2.0 ** (16 - record["skipped_steps"])
    assert 0 < record["masked_token_accuracy"] <= 1
    train.main(run_args(tiny_model_dir, tiny_data_dir, tmp_path / "run", "--epochs", "1"))
    best = str(tmp_path / "run" / "best")
    full = evaluate.main([best, "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p32")])
    half = evaluate.main([best, "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "p16"), "--amp",
                          "fp16"])
    assert half["sts_pearson"] == pytest.approx(full["sts_pearson"], abs=0.01) and half != full
    model = MultitaskBert.from_checkpoint(best)
    pairs = [("a man plays", "the man plays"), ("a cat", "why")]
    assert model.predict_similarity(pairs, amp="fp16") == pytest.approx(model.predict_similarity(pairs), abs=0.05)
