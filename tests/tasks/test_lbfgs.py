"""L-BFGS pieces: two-loop recursion against the explicit BFGS matrix, line-search properties."""

import numpy as np
import pytest
from fedpipe.tasks import lbfgs


def _bfgs_inverse(s_hist, y_hist):
    """The dense inverse-Hessian update the two-loop recursion must reproduce."""
    n = s_hist.shape[1]
    s, y = s_hist[-1], y_hist[-1]
    H = (s @ y) / (y @ y) * np.eye(n)
    for s, y in zip(s_hist, y_hist, strict=True):
        rho = 1.0 / (y @ s)
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H


def test_two_loop_equals_dense_bfgs():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    A = A @ A.T + 6 * np.eye(6)
    S = rng.standard_normal((4, 6))
    Y = S @ A  # exact curvature pairs of a quadratic
    g = rng.standard_normal(6)
    np.testing.assert_allclose(lbfgs.direction(g, S, Y), -_bfgs_inverse(S, Y) @ g, rtol=1e-10)


def test_no_history_is_steepest_descent():
    g = np.array([1.0, -2.0])
    np.testing.assert_array_equal(lbfgs.direction(g, *lbfgs.empty_history(2)), -g)


def test_push_pair_keeps_memory_and_skips_bad_curvature():
    S, Y = lbfgs.empty_history(2)
    for i in range(5):
        S, Y = lbfgs.push_pair(S, Y, np.array([1.0, i]), np.array([1.0, 0.0]), memory=3)
    assert S.shape == (3, 2) and S[-1, 1] == 4
    S2, _ = lbfgs.push_pair(S, Y, np.array([1.0, 0.0]), np.array([-1.0, 0.0]), memory=3)
    assert S2 is S


def _search(f, grad, x, d, config, alpha0=1.0):
    ls = lbfgs.line_search_start(f(x), grad(x) @ d, alpha0)
    while not ls.done:
        xa = lbfgs.trial_point(x, d, ls.alpha)
        ls = lbfgs.line_search_step(ls, f(xa), grad(xa) @ d, config)
    return ls


@pytest.mark.parametrize("alpha0", [1e-4, 1.0, 50.0])
def test_line_search_meets_strong_wolfe(alpha0):
    f = lambda x: np.sum(np.cosh(x)) + x[0]  # noqa: E731
    grad = lambda x: np.sinh(x) + np.array([1.0, 0.0])  # noqa: E731
    x, config = np.array([2.0, -1.0]), lbfgs.lbfgs()
    d = -grad(x)
    ls = _search(f, grad, x, d, config, alpha0)
    assert ls.done and not ls.failed
    xa = x + ls.alpha * d
    assert f(xa) <= f(x) + config.c1 * ls.alpha * (grad(x) @ d)
    assert abs(grad(xa) @ d) <= -config.c2 * (grad(x) @ d)


def test_non_finite_trial_is_shortened():
    f = lambda x: float(np.exp(x[0] ** 2))  # noqa: E731 - overflows for a long step
    grad = lambda x: np.array([2 * x[0] * np.exp(x[0] ** 2)])  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):
        ls = _search(f, grad, np.array([1.0]), np.array([-1e3]), lbfgs.lbfgs(), alpha0=1.0)
    assert ls.done and not ls.failed and 0 < ls.alpha < 1e-2


def test_ascent_direction_fails_at_once():
    ls = lbfgs.line_search_start(1.0, 0.5, 1.0)
    assert ls.done and ls.failed


def test_minimises_rosenbrock():
    def f(x):
        return float(100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2)

    def grad(x):
        return np.array([-400 * x[0] * (x[1] - x[0] ** 2) - 2 * (1 - x[0]), 200 * (x[1] - x[0] ** 2)])

    config, x = lbfgs.lbfgs(memory=5), np.array([-1.2, 1.0])
    S, Y = lbfgs.empty_history(2)
    for it in range(200):
        g = grad(x)
        if np.linalg.norm(g) < 1e-8:
            break
        d = lbfgs.direction(g, S, Y)
        ls = _search(f, grad, x, d, config, lbfgs.initial_step(g, it == 0))
        x_new = lbfgs.trial_point(x, d, ls.alpha)
        S, Y = lbfgs.push_pair(S, Y, x_new - x, grad(x_new) - g, config.memory)
        x = x_new
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-6)
    assert it < 60


@pytest.mark.parametrize("scale", [1e-6, 0.3, 1.0, 1e4])
def test_first_step_has_unit_length_whatever_the_scale(scale):
    g = scale * np.array([3.0, -4.0])
    assert np.linalg.norm(lbfgs.initial_step(g, True) * g) == pytest.approx(1.0)
    assert lbfgs.initial_step(g, False) == 1.0
    assert lbfgs.initial_step(np.zeros(2), True) == 1.0  # no direction: nothing to scale


def test_settings_are_checked():
    with pytest.raises(ValueError):
        lbfgs.lbfgs(c1=0.9, c2=0.1)
    with pytest.raises(ValueError):
        lbfgs.lbfgs(memory=0)
