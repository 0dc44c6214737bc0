"""The forms evaluate to their formulas, the fitting gradient is exact, and the
unit behaviour of the interaction term (trap 1) is what the algebra says."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_upcycle.scaling import published
from megatron_upcycle.scaling.datasets import FitData
from megatron_upcycle.scaling.fitting import FitOptions, LawFitter
from megatron_upcycle.scaling.laws import LAWS, effective_exponent, predict, rescale_tokens

rng = np.random.default_rng(0)
D1 = np.array([1e9, 4e9, 1.6e10, 6.4e10, 2e9])
D2 = np.array([2e9, 1e9, 8e9, 3e10, 5e10])
N1 = np.array([1e8, 3e8, 1e9, 3e9, 5e8])
P = np.array([2.0, 3.57, 7.0, 14.0, 5.0])
N2 = np.array([1e8, 5e8, 2e9, 4e9, 7e8])


def explicit(form: str, p: dict) -> np.ndarray:
    ln1 = np.log(D1)
    return {
        "d1d2_mult_int": lambda: p["A"] * D1 ** -p["a1"] * D2 ** (-p["a2"] + p["a3"] * ln1) + p["E"],
        "d1d2_mult": lambda: p["A"] * D1 ** -p["a1"] * D2 ** -p["a2"] + p["E"],
        "d1d2_add_int": lambda: p["A"] * D1 ** -p["a1"] + p["F"] * D2 ** (-p["a2"] + p["a3"] * ln1) + p["E"],
        "d1d2_add": lambda: p["A"] * D1 ** -p["a1"] + p["F"] * D2 ** -p["a2"] + p["E"],
        "config_add": lambda: p["A"] * P ** -p["b1"] + p["F"] * N2 ** -p["b2"] + p["E"],
        "config_add_int": lambda: p["A"] * P ** -p["b1"] + p["F"] * N2 ** (-p["b2"] + p["b3"] * np.log(P)) + p["E"],
        "config_mult": lambda: p["A"] * P ** -p["b1"] * N2 ** -p["b2"] + p["E"],
        "config_mult_int": lambda: p["A"] * P ** -p["b1"] * N2 ** (-p["b2"] + p["b3"] * np.log(P)) + p["E"],
        "joint": lambda: p["A"] * D1 ** -p["a1"] * D2 ** (-p["a2"] + p["a3"] * ln1) + p["B"] * N1 ** -p["b"] + p["E"],
        "chinchilla": lambda: p["A"] * D1 ** -p["a"] + p["B"] * N1 ** -p["b"] + p["E"],
        "one_size": lambda: p["A"] * D1 ** -p["a"] + p["E"],
    }[form]()


def random_params(form: str) -> dict:
    law = LAWS[form]
    out = {}
    for name in law.params:
        if name in law.amplitudes:
            out[name] = float(rng.uniform(0.5, 20.0))
        elif name in ("a3", "b3"):
            out[name] = float(rng.uniform(-2e-3, 2e-3))
        else:
            out[name] = float(rng.uniform(0.02, 0.3))
    return out


@pytest.mark.parametrize("form", ["d1d2_mult_int", "d1d2_mult", "d1d2_add_int", "d1d2_add", "config_add",
                                  "config_add_int", "config_mult", "config_mult_int", "joint", "chinchilla",
                                  "one_size"])
def test_predict_matches_formula(form):
    params = random_params(form)
    cols = {"D1": D1, "D2": D2, "N1": N1, "P": P, "N2": N2, "D": D1, "N": N1}
    np.testing.assert_allclose(predict(LAWS[form], params, cols), explicit(form, params), rtol=1e-12)


def test_shared_e_uses_each_half_on_its_rows():
    p = {"A_dense": 8.83, "a_dense": 0.088, "B_dense": 12.3, "b_dense": 0.116,
         "A_moe": 32.0, "a_moe": 0.161, "B_moe": 7.05, "b_moe": 0.08, "E": 0.165}
    is_moe = np.array([0, 1, 0, 1, 1], dtype=float)
    got = predict(LAWS["dense_moe_shared_E"], p, {"D": D1, "N": N1, "is_moe": is_moe})
    want = np.where(is_moe == 1, published.moe_loss(D1, N1), published.dense_loss(D1, N1))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("form,fixed", [("d1d2_add_int", None), ("joint", {"E": 0.165}),
                                        ("dense_moe_shared_E", None), ("config_mult_int", None)])
def test_objective_gradient_matches_finite_differences(form, fixed):
    law = LAWS[form]
    n = 12
    cols = {"D1": np.exp(rng.uniform(20, 25, n)), "D2": np.exp(rng.uniform(20, 25, n)),
            "N1": np.exp(rng.uniform(18, 22, n)), "P": np.exp(rng.uniform(0.5, 3, n)),
            "N2": np.exp(rng.uniform(18, 22, n)), "D": np.exp(rng.uniform(20, 25, n)),
            "N": np.exp(rng.uniform(18, 22, n)), "is_moe": (np.arange(n) % 2).astype(float)}
    truth = random_params(form)
    if fixed:
        truth.update(fixed)
    loss = predict(law, truth, cols) * np.exp(0.004 * rng.standard_normal(n))
    data = FitData(subset="test", columns={c: cols[c] for c in law.columns}, loss=loss,
                   run_ids=tuple(str(i) for i in range(n)))
    fitter = LawFitter(law, data, FitOptions(), fixed=fixed)
    c = fitter.offsets()
    w = rng.uniform(0.5, 2.0, n)
    theta = np.array([np.log(truth[p]) if p in law.amplitudes else truth[p]
                      for p in law.params if p not in (fixed or {})]) + 0.01 * rng.standard_normal(
        len(law.params) - len(fixed or {}))
    R = fitter._whitening(theta, c, w)
    G = fitter.F_free @ np.linalg.inv(R)
    phi = R @ theta
    f0, g = fitter._value_grad(phi, G, c, w)
    eps = 1e-6
    numeric = np.array([(fitter._value_grad(phi + eps * e, G, c, w)[0] - fitter._value_grad(phi - eps * e, G, c, w)[0])
                        / (2 * eps) for e in np.eye(len(phi))])
    np.testing.assert_allclose(g, numeric, rtol=1e-4, atol=1e-6 * max(1.0, abs(f0)))


def test_interaction_law_changes_plain_exponents_with_the_token_unit():
    # Trap 1: in billions of tokens a1 and a2 shift by a3 ln(1e9); the curve does not change.
    law = LAWS["joint"]
    p = dict(published.UPCYCLED)
    q = rescale_tokens(law, p, 1e9)
    shift = p["a3"] * np.log(1e9)
    assert q["a1"] == pytest.approx(p["a1"] - shift)
    assert q["a2"] == pytest.approx(p["a2"] - shift)
    assert abs(shift) > 0.016  # larger than a1 itself: the units matter
    raw = predict(law, p, {"D1": D1, "D2": D2, "N1": N1})
    billions = predict(law, q, {"D1": D1 / 1e9, "D2": D2 / 1e9, "N1": N1})
    np.testing.assert_allclose(raw, billions, rtol=1e-10)
    # The effective exponent at a given D1 is unit-free.
    assert effective_exponent(p, 1e10) == pytest.approx(effective_exponent(q, 10.0))


def test_paper_closed_form_is_four_billion_at_one_billion_parameters():
    assert float(published.closed_form_dstar(1e9)) == pytest.approx(4e9)
    assert float(published.closed_form_dstar(1e10)) < 4e9 < float(published.closed_form_dstar(1e8))
