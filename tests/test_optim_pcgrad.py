"""PCGrad (Yu et al. 2020, Alg. 1) on hand-derived cases and against a direct implementation."""
import torch

from minbert.optim import pcgrad


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_two_tasks_hand_derived():
    # g1·g2 = -1, ||g1||² = 1, ||g2||² = 2
    # g1' = [1,0] + 1/2 [-1,1] = [0.5,0.5];  g2' = [-1,1] + 1/1 [1,0] = [0,1];  sum = [0.5,1.5]
    (out,) = pcgrad([[t(1, 0)], [t(-1, 1)]], shuffle=False)
    torch.testing.assert_close(out, t(0.5, 1.5))


def test_three_tasks_hand_derived_uses_partially_projected_gradient():
    g1, g2, g3 = t(1, 0), t(-1, 1), t(0, -1)
    # task 1 (vs 2 then 3): ·g2 = -1 -> [0.5,0.5]; now ·g3 = -0.5 (g1·g3 = 0 originally!) -> [0.5,0]
    # task 2 (vs 1 then 3): ·g1 = -1 -> [0,1]; ·g3 = -1 -> [0,0]
    # task 3 (vs 1 then 2): ·g1 = 0 keep; ·g2 = -1 -> [0,-1] + 1/2 [-1,1] = [-0.5,-0.5]
    # sum = [0.5,0] + [0,0] + [-0.5,-0.5]
    (out,) = pcgrad([[g1], [g2], [g3]], shuffle=False)
    torch.testing.assert_close(out, t(0, -0.5))


def test_non_conflicting_gradients_are_summed_unchanged():
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.rand(3, 4, generator=gen), torch.rand(5, generator=gen)] for _ in range(3)]  # all dots > 0
    out = pcgrad(grads, generator=gen)
    for p in range(2):
        torch.testing.assert_close(out[p], sum(g[p] for g in grads))


def test_dot_product_is_global_not_per_tensor():
    # Conflict in tensor 0 only (-1), but globally -1 + 2 = 1 > 0: no projection, plain sum.
    out = pcgrad([[t(1), t(1)], [t(-1), t(2)]], shuffle=False)
    torch.testing.assert_close(out, [t(0), t(3)])
    # Tensor 1 alone agrees (+1), but globally -3 + 1 = -2 < 0: both tensors are projected.
    # g1' = [1,1] + 2/10 [-3,1] = [0.4,1.2];  g2' = [-3,1] + 2/2 [1,1] = [-2,2];  sum = [-1.6,3.2]
    out = pcgrad([[t(1), t(1)], [t(-3), t(1)]], shuffle=False)
    torch.testing.assert_close(out, [t(-1.6), t(3.2)])


def test_single_task_is_the_plain_gradient():
    grads = [torch.randn(2, 3), None, torch.randn(4)]
    out = pcgrad([grads])
    torch.testing.assert_close(out[0], grads[0])
    assert out[1] is None
    torch.testing.assert_close(out[2], grads[2])


def test_none_entries_count_as_zero():
    # Param 0: task 1 only; param 1: task 2 only; param 2: nobody. Flat g1 = [1,0 | 0], g2 = [0,0 | -1]: dot 0.
    out = pcgrad([[t(1, 0), None, None], [None, t(-1), None]], shuffle=False)
    torch.testing.assert_close(out[0], t(1, 0))
    torch.testing.assert_close(out[1], t(-1))
    assert out[2] is None
    # Flat g1 = [1 | 1], g2 = [0 | -1]: g1·g2 = -1, g1' = [1,1] + [0,-1] = [1,0];  g2' = [0,-1] + 1/2 [1,1]
    # sum = [1.5 | -0.5]
    out = pcgrad([[t(1), t(1)], [None, t(-1)]], shuffle=False)
    torch.testing.assert_close(out, [t(1.5), t(-0.5)])


def _direct_pcgrad(flat_grads, orders):
    """Alg. 1 written out on full vectors, with explicit per-task orders of the other tasks."""
    total = torch.zeros_like(flat_grads[0], dtype=torch.float64)
    for i, order in enumerate(orders):
        g = flat_grads[i].double().clone()
        for j in order:
            gj = flat_grads[j].double()
            if g @ gj < 0:
                g -= (g @ gj) / (gj @ gj) * gj
        total += g
    return total


def test_matches_direct_implementation_on_random_conflicts():
    gen = torch.Generator().manual_seed(2)
    k = 4
    grads = [[torch.randn(3, 5, generator=gen), torch.randn(6, generator=gen)] for _ in range(k)]
    flat = [torch.cat([g.reshape(-1) for g in task]) for task in grads]
    out = pcgrad(grads, shuffle=False)
    expected = _direct_pcgrad(flat, [[j for j in range(k) if j != i] for i in range(k)]).float()
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), expected, rtol=1e-5, atol=1e-5)


def test_shuffle_is_seeded_and_changes_order():
    g1, g2, g3 = t(1, 0), t(-1, 1), t(0, -1)  # result depends on the projection order (see 3-task case)
    grads = [[g1], [g2], [g3]]
    runs = [pcgrad(grads, generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    again = [pcgrad(grads, generator=torch.Generator().manual_seed(s))[0] for s in range(20)]
    for a, b in zip(runs, again):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in runs}) > 1


def test_bf16_inputs_give_finite_bf16_outputs():
    gen = torch.Generator().manual_seed(3)
    grads32 = [[torch.randn(1000, generator=gen) * 50, torch.randn(10, 10, generator=gen)] for _ in range(3)]
    grads16 = [[g.bfloat16() for g in task] for task in grads32]
    out16 = pcgrad(grads16, shuffle=False)
    out32 = pcgrad([[g.float() for g in task] for task in grads16], shuffle=False)
    for a, b in zip(out16, out32):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b.bfloat16())
