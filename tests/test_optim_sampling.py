"""Task sampling: empirical frequencies match the formulas; deterministic orders; seeded resume."""
from collections import Counter

import pytest

from minbert.optim import TaskSampler, annealing_alpha, batches_per_task

SIZES = {"a": 1000, "b": 4000, "c": 16000}  # batch_size 1 -> 21000 draws per epoch
TOL = 0.015  # > 4 standard deviations of a frequency over 21000 draws


def _frequencies(sampler, epoch):
    counts = Counter(sampler.schedule(epoch))
    return {task: counts[task] / sampler.steps_per_epoch for task in sampler.tasks}


def test_batches_per_task():
    sizes = {"sst": 8544, "para": 141498, "sts": 6040}
    assert batches_per_task(sizes, 64) == {"sst": 134, "para": 2211, "sts": 95}


def test_annealing_alpha():
    assert annealing_alpha(1, 5) == 1.0
    assert annealing_alpha(3, 5) == pytest.approx(0.6)
    assert annealing_alpha(5, 5) == pytest.approx(0.2)
    assert annealing_alpha(5, 5, c=0.5) == pytest.approx(0.5)
    assert annealing_alpha(1, 1) == 1.0


def test_random_is_uniform():
    freq = _frequencies(TaskSampler(SIZES, "random", seed=1), 1)
    assert freq == pytest.approx({t: 1 / 3 for t in SIZES}, abs=TOL)


def test_proportional_frequencies():
    sampler = TaskSampler(SIZES, "proportional", seed=2)
    assert sampler.steps_per_epoch == 21000
    assert _frequencies(sampler, 1) == pytest.approx({"a": 1 / 21, "b": 4 / 21, "c": 16 / 21}, abs=TOL)


def test_annealed_frequencies_first_and_last_epoch():
    sampler = TaskSampler(SIZES, "annealed", num_epochs=5, anneal_c=0.8, seed=3)
    # e = 1: alpha = 1, proportional.  e = E: alpha = 0.2, p_i ∝ N_i^0.2 = 1000^0.2 * (1, 4^0.2, 16^0.2)
    assert _frequencies(sampler, 1) == pytest.approx({"a": 1 / 21, "b": 4 / 21, "c": 16 / 21}, abs=TOL)
    weights = {"a": 1.0, "b": 4**0.2, "c": 16**0.2}
    expected = {t: w / sum(weights.values()) for t, w in weights.items()}
    assert sampler.probabilities(5) == pytest.approx(expected)
    assert _frequencies(sampler, 5) == pytest.approx(expected, abs=TOL)


def test_round_robin_order_exact():
    equal = TaskSampler({"sst": 30, "para": 30, "sts": 30}, "round_robin", batch_size=10,
                        order=["sts", "para", "sst"])
    assert equal.schedule(1) == ["sts", "para", "sst"] * 3
    natural = TaskSampler({"sst": 10, "para": 30, "sts": 20}, "round_robin", batch_size=10)
    assert natural.schedule(1) == ["sst", "para", "sts", "para", "sts", "para"]  # exhausted tasks drop out


def test_sequential_order_exact():
    sampler = TaskSampler({"sst": 3, "para": 1, "sts": 2}, "sequential", order=["sts", "para", "sst"])
    assert sampler.schedule(1) == ["sts", "sts", "para", "sst", "sst", "sst"]
    with pytest.raises(ValueError):
        TaskSampler({"sst": 3, "para": 1}, "sequential", order=["sts", "para"])


def test_seeded_schedules_differ_across_epochs_and_seeds():
    first = TaskSampler(SIZES, "random", seed=4)
    assert first.schedule(1) == TaskSampler(SIZES, "random", seed=4).schedule(1)
    assert first.schedule(1) != first.schedule(2)
    assert first.schedule(1) != TaskSampler(SIZES, "random", seed=5).schedule(1)
