"""L-BFGS as pure functions: the two-loop recursion and a strong-Wolfe line search.

The engine owns the loop and evaluates the objective at the trial points this module asks
for (each evaluation is one distributed pass); everything here is arithmetic on flat NumPy
vectors and small immutable states, so it is tested without a cluster and checkpoints as arrays.

One L-BFGS iteration::

    d = direction(g, s_hist, y_hist)                       # -H g
    ls = line_search_start(f, g @ d, initial_step(g, first))
    while not ls.done:
        f_a, g_a = objective(trial_point(x, d, ls.alpha))   # the distributed pass
        ls = line_search_step(ls, f_a, g_a @ d, config)
    x_new = trial_point(x, d, ls.alpha)                    # the accepted point
    s_hist, y_hist = push_pair(s_hist, y_hist, x_new - x, g_new - g, config.memory)

References
----------
J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer, 2006:
Algorithm 7.4 (two-loop recursion), eq. 7.20 (initial Hessian scaling), Algorithms 3.5 and
3.6 (line search and zoom for the strong Wolfe conditions), eq. 3.59 (cubic interpolation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class LBFGS(NamedTuple):
    """Settings of the L-BFGS solver (the engine recognises this type in place of an Optimizer).

    Attributes
    ----------
    memory : int
        Number of ``(s, y)`` pairs kept.
    c1, c2 : float
        Sufficient-decrease and curvature constants of the strong Wolfe conditions.
    max_trials : int
        Objective evaluations allowed per line search.
    """

    memory: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    max_trials: int = 20


def lbfgs(memory: int = 10, c1: float = 1e-4, c2: float = 0.9, max_trials: int = 20) -> LBFGS:
    """Build L-BFGS settings, checking them.

    Parameters
    ----------
    memory : int
        Curvature pairs kept (>= 1).
    c1, c2 : float
        Wolfe constants, ``0 < c1 < c2 < 1``.
    max_trials : int
        Objective evaluations per line search (>= 1).

    Returns
    -------
    LBFGS

    References
    ----------
    Nocedal & Wright (2006), Algorithm 7.5.
    """
    if memory < 1:
        raise ValueError(f"memory must be at least 1, got {memory}")
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if max_trials < 1:
        raise ValueError(f"max_trials must be at least 1, got {max_trials}")
    return LBFGS(memory, c1, c2, max_trials)


def empty_history(n_params: int) -> tuple[np.ndarray, np.ndarray]:
    """No curvature pairs yet: two ``(0, n_params)`` arrays (saveable in a checkpoint)."""
    return np.zeros((0, n_params)), np.zeros((0, n_params))


def direction(grad: np.ndarray, s_hist: np.ndarray, y_hist: np.ndarray) -> np.ndarray:
    """Search direction ``-H grad`` by the two-loop recursion (oldest pair first in the arrays).

    With no pairs it is the steepest-descent direction ``-grad``.

    References
    ----------
    Nocedal & Wright (2006), Algorithm 7.4 and eq. 7.20.
    """
    q = np.array(grad, dtype=np.float64)
    k = len(s_hist)
    rho = np.array([1.0 / (y_hist[i] @ s_hist[i]) for i in range(k)])
    alpha = np.zeros(k)
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * (s_hist[i] @ q)
        q -= alpha[i] * y_hist[i]
    # H0 = gamma I with gamma = s'y / y'y from the newest pair: scales steps to the curvature.
    gamma = (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1]) if k else 1.0
    r = gamma * q
    for i in range(k):
        beta = rho[i] * (y_hist[i] @ r)
        r += s_hist[i] * (alpha[i] - beta)
    return -r


def push_pair(
    s_hist: np.ndarray, y_hist: np.ndarray, s: np.ndarray, y: np.ndarray, memory: int
) -> tuple[np.ndarray, np.ndarray]:
    """Append the pair ``(s, y)``, dropping the oldest beyond ``memory``.

    A pair without positive curvature (``s'y <= 1e-10 * y'y``) is skipped: it would make the
    inverse-Hessian approximation indefinite.
    """
    if not s @ y > 1e-10 * (y @ y):
        return s_hist, y_hist
    return np.vstack([s_hist, s])[-memory:], np.vstack([y_hist, y])[-memory:]


def update_history(s_hist: np.ndarray, y_hist: np.ndarray, x_old: np.ndarray,
                   x_new: np.ndarray, g_old: np.ndarray, g_new: np.ndarray,
                   memory: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`push_pair` with the step ``x_new - x_old`` and gradient change ``g_new - g_old``."""
    return push_pair(s_hist, y_hist, x_new - x_old, g_new - g_old, memory)


def initial_step(grad: np.ndarray, first: bool) -> float:
    """First trial step: ``1`` (L-BFGS directions are well scaled), ``1/||g||`` on iteration one.

    With no curvature pair yet the direction is ``-g``, whose length says nothing about the
    distance to the minimum; a first step of unit length (as SciPy's L-BFGS-B takes) is
    invariant to the scale of the objective, whereas ``alpha = 1`` undershoots badly when the
    gradient is small (a mean loss), costing an extra iteration or more.

    References
    ----------
    R. H. Byrd, P. Lu, J. Nocedal and C. Zhu, "A limited memory algorithm for bound constrained
    optimization", SIAM J. Sci. Comput. 16(5), 1995 (``stp = 1/||d||`` on the first iteration
    of the L-BFGS-B code).
    """
    if not first:
        return 1.0
    norm = float(np.linalg.norm(grad))
    return 1.0 / norm if 0.0 < norm < math.inf else 1.0


def trial_point(params: np.ndarray, d: np.ndarray, alpha: float) -> np.ndarray:
    """``params + alpha * d``."""
    return params + alpha * d


class LineSearch(NamedTuple):
    """State of one strong-Wolfe line search along a fixed direction.

    ``(a_lo, f_lo, dg_lo)`` is the best point meeting sufficient decrease so far (``a_lo = 0`` is
    the start); ``a_hi`` bounds the bracket (``inf`` until one is found). ``alpha`` is the next
    trial, or the accepted step once ``done``; ``failed`` means no acceptable step was found.
    """

    f0: float
    dg0: float
    alpha: float
    a_lo: float
    f_lo: float
    dg_lo: float
    a_hi: float
    f_hi: float
    dg_hi: float
    trials: int
    done: bool
    failed: bool


def line_search_start(f0: float, dg0: float, alpha0: float) -> LineSearch:
    """Start a line search at ``f0`` with directional derivative ``dg0 < 0``, first trial ``alpha0``."""
    if not dg0 < 0:  # not a descent direction: nothing to search
        return LineSearch(f0, dg0, 0.0, 0.0, f0, dg0, math.inf, math.inf, 0.0, 0, True, True)
    return LineSearch(f0, dg0, alpha0, 0.0, f0, dg0, math.inf, math.inf, 0.0, 0, False, False)


def line_search_step(ls: LineSearch, f_a: float, dg_a: float, config: LBFGS) -> LineSearch:
    """Take the objective ``f_a`` and slope ``dg_a`` at ``ls.alpha``; return the next state.

    Bracketing phase and zoom share one rule: a trial failing sufficient decrease (or no better
    than ``a_lo``) becomes ``a_hi``; one meeting the curvature condition is accepted; otherwise
    it becomes ``a_lo`` (the old ``a_lo`` turning into ``a_hi`` when the slope says the minimum
    lies behind). Non-finite values count as failing sufficient decrease, so a step into an
    overflowing region is simply shortened.

    References
    ----------
    Nocedal & Wright (2006), Algorithms 3.5 and 3.6.
    """
    a = ls.alpha
    trials = ls.trials + 1
    lo, hi = (ls.a_lo, ls.f_lo, ls.dg_lo), (ls.a_hi, ls.f_hi, ls.dg_hi)
    armijo = math.isfinite(f_a) and f_a <= ls.f0 + config.c1 * a * ls.dg0
    if not armijo or f_a >= ls.f_lo:
        hi = (a, f_a, dg_a)
    else:
        if abs(dg_a) <= -config.c2 * ls.dg0:
            return ls._replace(alpha=a, a_lo=a, f_lo=f_a, dg_lo=dg_a, trials=trials, done=True)
        if dg_a * (hi[0] - lo[0]) >= 0:
            hi = lo
        lo = (a, f_a, dg_a)
    if trials >= config.max_trials:
        # Out of evaluations: settle for the best decreasing point, if there is one.
        return ls._replace(alpha=lo[0], a_lo=lo[0], f_lo=lo[1], dg_lo=lo[2], a_hi=hi[0],
                           f_hi=hi[1], dg_hi=hi[2], trials=trials, done=True, failed=lo[0] == 0)
    nxt = 2.0 * lo[0] if math.isinf(hi[0]) else _interpolate(lo, hi)
    return ls._replace(alpha=nxt, a_lo=lo[0], f_lo=lo[1], dg_lo=lo[2], a_hi=hi[0], f_hi=hi[1],
                       dg_hi=hi[2], trials=trials)


def _interpolate(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> float:
    """Minimiser of the cubic through both ends, kept inside the middle 80 % of the bracket.

    References
    ----------
    Nocedal & Wright (2006), eq. 3.59.
    """
    (a0, f0, d0), (a1, f1, d1) = lo, hi
    left, right = min(a0, a1), max(a0, a1)
    width = right - left
    guess = 0.5 * (a0 + a1)
    if math.isfinite(f1) and math.isfinite(d1) and a1 != a0:
        t1 = d0 + d1 - 3.0 * (f0 - f1) / (a0 - a1)
        disc = t1 * t1 - d0 * d1
        if disc >= 0:
            t2 = math.copysign(math.sqrt(disc), a1 - a0)
            denom = d1 - d0 + 2.0 * t2
            if denom != 0:
                guess = a1 - (a1 - a0) * (d1 + t2 - t1) / denom
    if not math.isfinite(guess):
        guess = 0.5 * (a0 + a1)
    return min(max(guess, left + 0.1 * width), right - 0.1 * width)
