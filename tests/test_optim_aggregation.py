"""Gradient aggregators (optim.aggregation) against hand derivations, closed forms, KKT conditions and scipy."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors, save as save_tensors
from scipy.optimize import minimize

from minbert.optim.aggregation import AGGREGATORS, _min_norm, _project, aggregator
from minbert.optim.pcgrad import pcgrad

MEAN_SCALE = {"mgda", "imtl_g", "cagrad", "upgrad", "dualproj"}  # the paper's scale is a mean's: sum = k · paper


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def random_jacobian(k, d, seed):
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def combined(name, J, **hparams):
    """The aggregator's combined gradient of the rows of J (float64 weights applied in float64), and its weights."""
    w = aggregator(name, len(J), **hparams).weights(J @ J.T)
    return w @ J, w


def slsqp(objective, k, lower=None, simplex=True):
    """scipy's SLSQP on the objective written out directly, at tight tolerance, from the simplex centre."""
    lower = np.zeros(k) if lower is None else lower
    start = np.maximum(np.full(k, 1 / k), lower) if simplex else lower + 1.0
    constraints = [{"type": "eq", "fun": lambda x: x.sum() - 1}] if simplex else []
    constraints.append({"type": "ineq", "fun": lambda x: x - lower})
    res = minimize(objective, start, method="SLSQP", constraints=constraints, options={"ftol": 1e-15, "maxiter": 500})
    return torch.tensor(res.x)


# --- registry, arguments -------------------------------------------------------------------------------------------

def test_registry_and_argument_errors():
    assert AGGREGATORS == ("sum", "mean", "pcgrad", "mgda", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl", "upgrad",
                           "dualproj", "gradvac")
    with pytest.raises(ValueError, match="upgrad"):
        aggregator("famo", 3)
    with pytest.raises(ValueError, match="valid: c, rescale, scale"):
        aggregator("cagrad", 3, alpha=0.5)
    for name, bad in [("cagrad", dict(c=-1)), ("cagrad", dict(rescale=3)), ("mgda", dict(normalization="norm")),
                      ("nash_mtl", dict(max_norm=-1)), ("nash_mtl", dict(update_every=0)), ("gradvac", dict(beta=0)),
                      ("sum", dict(scale="mean"))]:
        with pytest.raises(ValueError):
            aggregator(name, 3, **bad)
    with pytest.raises(ValueError, match="at least one task"):
        aggregator("mean", 0)
    agg = aggregator("mgda", 2, normalization="loss")
    assert agg.needs_losses and not aggregator("mgda", 2, normalization="l2").needs_losses
    assert [n for n in AGGREGATORS if aggregator(n, 2).needs_losses] == []
    with pytest.raises(ValueError, match="losses"):
        agg.weights(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        agg.weights(torch.eye(3, dtype=torch.float64), torch.ones(2))
    with pytest.raises(ValueError, match="expected 2 tasks"):
        agg([[t(1)]], torch.ones(2))
    with pytest.raises(ValueError, match="keys"):
        aggregator("gradvac", 2).load_state_dict({"generator": torch.Generator().get_state()})


# --- the shared mechanism ------------------------------------------------------------------------------------------

def test_pcgrad_aggregator_is_bit_identical_to_pcgrad():
    gen = torch.Generator().manual_seed(1)
    for k, seed in [(3, 0), (4, 7)]:
        agg, ref_gen = aggregator("pcgrad", k, seed=seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            grads = [[torch.randn(3, 4, generator=gen), None if i == 1 else torch.randn(5, generator=gen), None]
                     for i in range(k)]
            for a, b in zip(agg(grads), pcgrad(grads, generator=ref_gen)):
                assert (a is None and b is None) or torch.equal(a, b)
            assert torch.equal(agg.state_dict()["generator"], ref_gen.get_state())


@pytest.mark.parametrize("name", AGGREGATORS)
def test_call_is_the_weights_applied_to_the_flat_gradients(name):
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen).bfloat16() if i != 0 else None, None,
              torch.randn(5, generator=gen)] for i in range(3)]
    agg = aggregator(name, 3)
    losses = torch.tensor([0.7, 1.3, 0.2])
    out = agg(grads, losses)
    flat = torch.stack([torch.cat([g[0].reshape(-1), (g[1] if g[1] is not None else torch.zeros(4)).float(),
                                   g[3]]) for g in grads])  # (3, 15)
    assert agg.last_weights.dtype == torch.float64 and agg.last_weights.shape == (3,)
    expected = agg.last_weights.float() @ flat
    assert out[2] is None and out[1].dtype == torch.bfloat16 and out[0].shape == (3, 2)
    torch.testing.assert_close(torch.cat([out[0].reshape(-1), out[3]]), torch.cat([expected[:6], expected[10:]]))
    torch.testing.assert_close(out[1], expected[6:10].bfloat16())


# --- degenerate inputs, scale ---------------------------------------------------------------------------------------

G1, H1 = t(1, 2, -1, 0.5), t(0.5, -1, 2, 1)
ZERO = torch.zeros(4)
R1, R2 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))  # float32 rounding: singular up to noise
CASES = {"one": [G1], "identical": [G1, G1, G1], "zero_task": [G1, ZERO, H1], "all_zero": [ZERO, ZERO, ZERO],
         "opposite": [G1, -G1], "opposite_and_other": [G1, -G1, H1], "dependent_sum": [G1, H1, G1 + H1],
         "dependent_multiple": [G1, 2 * G1, H1], "dependent_rounded": [R1, R2, R1 + R2, 3.1 * R1]}
CONFIGS = [(n, {}) for n in AGGREGATORS] + [
    ("mgda", dict(normalization="l2")), ("mgda", dict(normalization="loss")), ("mgda", dict(normalization="loss+")),
    ("cagrad", dict(rescale=0)), ("cagrad", dict(c=1.5)), ("nash_mtl", dict(max_norm=0)), ("gradvac", dict(beta=1.0))]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name,hparams", CONFIGS, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in CONFIGS])
def test_degenerate_inputs_give_finite_gradients(name, hparams, case):
    grads = CASES[case]
    agg = aggregator(name, len(grads), **hparams)
    losses = torch.tensor([1.0, 0.0, 2.0, 0.5][:len(grads)])  # a zero loss too
    for _ in range(3):  # stateful methods: their state must stay finite as well
        (out,) = agg([[g] for g in grads], losses)
        assert torch.isfinite(out).all() and torch.isfinite(agg.last_weights).all()
        assert all(torch.isfinite(v).all() for v in agg.state_dict().values() if v.is_floating_point())
    if case == "all_zero":
        assert torch.equal(out, ZERO)
    if case == "one":  # a scale of the one gradient
        torch.testing.assert_close(out, (out @ G1) / (G1 @ G1) * G1)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_sum_scale_k_identical_gradients_give_k_g(name):
    g = t(0.3, -0.2, 0.1, 0.4)
    hparams = {"cagrad": dict(rescale=2), "nash_mtl": dict(max_norm=0)}.get(name, {})  # the paper's own rescalings off
    (out,) = aggregator(name, 3, **hparams)([[g], [g], [g]])
    torch.testing.assert_close(out, g if name == "mean" else 3 * g)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_paper_scale_against_sum_scale(name):
    J = random_jacobian(3, 6, 0)
    hparams = {"nash_mtl": dict(max_norm=0)}.get(name, {})
    w_sum = aggregator(name, 3, **hparams).weights(J @ J.T)
    w_paper = aggregator(name, 3, scale="paper", **hparams).weights(J @ J.T)
    factor = 3 if name in MEAN_SCALE else math.sqrt(torch.linalg.matrix_norm(J @ J.T)) if name == "nash_mtl" else 1
    torch.testing.assert_close(w_sum, factor * w_paper, rtol=1e-10, atol=1e-12)


# --- MGDA -----------------------------------------------------------------------------------------------------------

def test_mgda_two_tasks_closed_form():
    cases = [(t(1, 0), t(-1, 1)), (t(1, 0), t(3, 1)), (t(2, 1), t(0.1, 0)), (t(1, 2), t(-2, 0.5))]
    for g1, g2 in [(a.double(), b.double()) for a, b in cases]:
        gamma = float(((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1))  # Sener & Koltun 2018, Alg. 1
        d, w = combined("mgda", torch.stack([g1, g2]), scale="paper")
        torch.testing.assert_close(w, torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    # l2: the min-norm point of the unit gradients, its weights applied to the raw ones
    g1, g2 = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    gamma = float((u2 - u1) @ u2 / ((u1 - u2) @ (u1 - u2)))
    d, w = combined("mgda", torch.stack([g1, g2]), normalization="l2", scale="paper")
    torch.testing.assert_close(d, gamma * g1 + (1 - gamma) * g2)
    # loss: gradients divided by their losses for the solver only
    agg, losses = aggregator("mgda", 2, normalization="loss", scale="paper"), torch.tensor([2.0, 0.5])
    v1, v2 = g1 / 2.0, g2 / 0.5
    gamma = float(((v2 - v1) @ v2 / ((v1 - v2) @ (v1 - v2))).clamp(0, 1))
    torch.testing.assert_close(agg.weights(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T, losses),
                               torch.tensor([gamma, 1 - gamma], dtype=torch.float64))


def test_mgda_matches_scipy_on_random_gram():
    for seed in range(3):
        J = random_jacobian(4, 5, seed)
        G = (J @ J.T).numpy()
        ref = slsqp(lambda x: x @ G @ x, 4)
        _, w = combined("mgda", J, scale="paper")
        torch.testing.assert_close(w, ref, atol=1e-6, rtol=0)


# --- IMTL-G ---------------------------------------------------------------------------------------------------------

def test_imtl_g_equal_projections_on_every_unit_gradient():
    for k, seed in [(2, 0), (3, 1), (4, 2)]:
        J = random_jacobian(k, 9, seed)
        d, w = combined("imtl_g", J, scale="paper")
        projections = J @ d / J.norm(dim=1)  # d·u_i
        torch.testing.assert_close(projections, projections[0].expand(k), rtol=1e-10, atol=1e-10)
        assert abs(float(w.sum()) - 1) < 1e-12


# --- CAGrad ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [0.2, 0.4, 0.9])
def test_cagrad_kkt_and_scipy(c):
    for k, seed in [(2, 3), (3, 4), (4, 5)]:
        J = random_jacobian(k, 6, seed)
        G = J @ J.T
        b = torch.full((k,), 1 / k, dtype=torch.float64)
        sqrt_phi = c * float(b @ G @ b) ** 0.5  # c‖g_0‖
        _, weights = combined("cagrad", J, c=c, rescale=0, scale="paper")
        r = float((weights - b).sum())  # weights = b + r·w, Σw = 1
        w = (weights - b) / r
        norm_w = float(w @ G @ w) ** 0.5
        assert w.min() > -1e-10 and abs(r - sqrt_phi / norm_w) < 1e-8  # d = g_0 + √φ/‖g_w‖ g_w
        grad = G @ b + sqrt_phi * (G @ w) / norm_w  # ∇ of g_w·g_0 + √φ‖g_w‖ on the simplex: KKT
        lam = float(grad[w > 1e-9].mean())
        torch.testing.assert_close(grad[w > 1e-9], torch.full_like(grad[w > 1e-9], lam), atol=1e-9, rtol=0)
        assert (grad[w <= 1e-9] >= lam - 1e-9).all()
        Gn = G.numpy()
        ref = slsqp(lambda x: x @ Gn @ b.numpy() + sqrt_phi * math.sqrt(max(x @ Gn @ x, 0.0)), k)
        torch.testing.assert_close(w, ref, atol=1e-5, rtol=0)
        for rescale, divisor in [(1, 1 + c ** 2), (2, 1 + c)]:
            torch.testing.assert_close(combined("cagrad", J, c=c, rescale=rescale, scale="paper")[1],
                                       weights / divisor)


# --- Nash-MTL -------------------------------------------------------------------------------------------------------

def test_nash_mtl_solves_alpha_g_alpha_equals_one():
    for k, seed in [(2, 0), (3, 1), (5, 2)]:
        J = random_jacobian(k, 8, seed) * 10.0 ** seed  # any scale
        G = J @ J.T
        alpha = aggregator("nash_mtl", k, max_norm=0, scale="paper").weights(G)
        assert alpha.min() > 0
        torch.testing.assert_close(alpha * (G @ alpha), torch.ones(k, dtype=torch.float64), atol=1e-6, rtol=0)
        alpha = aggregator("nash_mtl", k, max_norm=0).weights(G)  # the sum's scale: for G/‖G‖_F
        G_hat = G / torch.linalg.matrix_norm(G)
        torch.testing.assert_close(alpha * (G_hat @ alpha), torch.ones(k, dtype=torch.float64), atol=1e-6, rtol=0)


def test_nash_mtl_torchjd_example_clip_and_update_every():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)  # TorchJD's NashMTL docstring
    d, _ = combined("nash_mtl", J, max_norm=1.0)
    torch.testing.assert_close(d, torch.tensor([0.0542, 0.7061, 0.7061], dtype=torch.float64), atol=2e-4, rtol=0)
    agg = aggregator("nash_mtl", 2, max_norm=0, update_every=3)
    other = random_jacobian(2, 3, 0)
    grams = [J @ J.T, 2 * J @ J.T, 5 * J @ J.T, other @ other.T]
    ws = [agg.weights(G) for G in grams]
    assert torch.equal(ws[0], ws[1]) and torch.equal(ws[0], ws[2]) and not torch.allclose(ws[0], ws[3])
    assert int(agg.state_dict()["step"]) == 4
    clipped = aggregator("nash_mtl", 2, max_norm=0.5).weights(grams[2])
    assert abs(float(clipped @ grams[2] @ clipped) ** 0.5 - 0.5) < 1e-12


# --- Aligned-MTL ----------------------------------------------------------------------------------------------------

def test_aligned_mtl_is_the_sum_of_orthogonal_equal_norm_rows():
    for k, seed in [(2, 0), (3, 1), (4, 2)]:
        J = random_jacobian(k, 7, seed)
        U, S, Vh = torch.linalg.svd(J, full_matrices=False)
        aligned = S.min() * U @ Vh  # σ_min U Vᵀ (Senushkin et al. 2023): the aligned task gradients, rows
        torch.testing.assert_close(aligned @ aligned.T, S.min() ** 2 * torch.eye(k, dtype=torch.float64))
        d, _ = combined("aligned_mtl", J)
        torch.testing.assert_close(d, aligned.sum(0))
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)  # TorchJD's docstring (their mean: /2)
    torch.testing.assert_close(combined("aligned_mtl", J)[0] / 2, torch.tensor([0.2133, 0.9673, 0.9673],
                                                                               dtype=torch.float64), atol=1e-4, rtol=0)


# --- UPGrad, DualProj and their QP ----------------------------------------------------------------------------------

def test_upgrad_does_not_conflict_and_is_pcgrad_for_two_tasks():
    for seed in range(3):
        J = random_jacobian(4, 5, seed)
        d, _ = combined("upgrad", J)
        assert (J @ d).min() > -1e-9  # J·d ≥ 0
    pairs = [(t(1, 0), t(-1, 1)), (t(1, 2), t(3, -1)), (t(2, 1), t(-3, -1)), (t(1, 1), t(2, 3))]
    for g1, g2 in pairs:
        J = torch.stack([g1, g2]).double()
        (ref,) = pcgrad([[g1.double()], [g2.double()]], shuffle=False)  # Quinton & Rey 2024: for 2 tasks, PCGrad
        torch.testing.assert_close(combined("upgrad", J)[0], ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(combined("upgrad", J, scale="paper")[0], ref / 2, rtol=1e-6, atol=1e-6)


def test_dualproj_is_the_projection_of_the_mean():
    for k, seed in [(2, 0), (3, 1), (4, 2), (5, 3)]:
        J = random_jacobian(k, 4, seed)
        G = J @ J.T
        u = torch.full((k,), 1 / k, dtype=torch.float64)
        d, w = combined("dualproj", J, scale="paper")
        Gw = G @ w  # = J·d: the multipliers of v ≥ u
        assert (w - u).min() > -1e-12 and Gw.min() > -1e-9 and ((w - u) * Gw).abs().max() < 1e-9  # KKT
    torch.testing.assert_close(combined("dualproj", J)[1], k * w)


def test_dual_cone_projection_and_min_norm_solvers_match_scipy():
    gen = torch.Generator().manual_seed(0)
    for k, seed in [(3, 0), (4, 1), (6, 2), (8, 3)]:
        J = random_jacobian(k, k + 2, seed)
        G = J @ J.T
        lower = torch.randn(k, generator=gen, dtype=torch.float64)
        v, ref = _project(G, lower), slsqp(lambda x: x @ G.numpy() @ x, k, lower.numpy(), simplex=False)
        torch.testing.assert_close(v, ref, atol=1e-6, rtol=0)
        assert (v - lower).min() >= 0 and float(v @ G @ v) <= float(ref @ G @ ref) + 1e-12
        torch.testing.assert_close(_min_norm(G), slsqp(lambda x: x @ G.numpy() @ x, k), atol=1e-6, rtol=0)


# --- GradVac --------------------------------------------------------------------------------------------------------

def test_gradvac_first_step_is_pcgrad_and_moves_cosine_to_target():
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(6, generator=gen, dtype=torch.float64)] for _ in range(4)]
    (vac,) = aggregator("gradvac", 4, seed=3)(grads)  # targets 0: PCGrad's projections, in the same order
    (pc,) = pcgrad(grads, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vac, pc, rtol=1e-6, atol=1e-6)
    # Eq. 2 sets cos(g_1', g_2) to the target; a target of -1 never moves g_2, so g_1' = d − g_2
    g1, g2 = torch.tensor([1.0, 0.2], dtype=torch.float64), torch.tensor([-0.5, 1.0], dtype=torch.float64)
    agg = aggregator("gradvac", 2, beta=0.1)
    agg.load_state_dict({**agg.state_dict(), "targets": torch.tensor([[0.0, 0.5], [-1.0, 0.0]])})
    (d,) = agg([[g1], [g2]])
    g1_new = d - g2
    phi = float(g1 @ g2 / (g1.norm() * g2.norm()))
    assert abs(float(g1_new @ g2 / (g1_new.norm() * g2.norm())) - 0.5) < 1e-6  # combined in float32
    torch.testing.assert_close(agg.targets, torch.tensor([[0.0, 0.9 * 0.5 + 0.1 * phi], [0.9 * -1 + 0.1 * phi, 0.0]],
                                                         dtype=torch.float64))


# --- state ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hparams", [("pcgrad", dict(seed=5)), ("gradvac", dict(seed=5, beta=0.3)),
                                          ("nash_mtl", dict(update_every=2))])
def test_state_dict_round_trip_gives_identical_weights(name, hparams):
    gen = torch.Generator().manual_seed(6)
    grams = [(J @ J.T) for J in (torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(6))]
    agg = aggregator(name, 4, **hparams)
    for G in grams[:3]:
        agg.weights(G)
    restored = aggregator(name, 4, **{**hparams, "seed": 99} if "seed" in hparams else hparams)
    restored.load_state_dict(load_tensors(save_tensors(agg.state_dict())))  # tensors only: safetensors
    for G in grams[3:]:
        assert torch.equal(agg.weights(G), restored.weights(G))
    for stateless in set(AGGREGATORS) - {"pcgrad", "gradvac", "nash_mtl"}:
        assert aggregator(stateless, 2).state_dict() == {}
