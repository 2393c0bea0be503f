"""What a federated client computes on its own rows: local training.

Pure NumPy on concrete arrays. The randomness of a client's round (its mini-batch order) comes
from ``(seed, round, client)`` only, so any worker that runs the task gets the same result.
A client's test metrics are the data-parallel engine's: :func:`fedpipe.tasks.reduce.eval_sums` of its
test rows, added over clients and finished by :func:`fedpipe.tasks.reduce.finish_metrics`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .models import Model
from .optimizers import Optimizer

Packet = dict[str, np.ndarray]


class LocalResult(NamedTuple):
    """Output of :func:`local_train`.

    Attributes
    ----------
    packet : dict of str to ndarray
        What enters the aggregation chain: ``delta`` (trained minus received params), ``n`` (rows,
        0-d) and, with SCAFFOLD, ``control`` (change of the client's control variate).
    metrics : dict of str to float
        ``train_loss`` (mean data loss over the batches seen), ``n``, ``steps``.
    control : ndarray or None
        The client's new SCAFFOLD control variate ``c_i`` (kept on its worker), else None.
    """

    packet: Packet
    metrics: dict[str, float]
    control: np.ndarray | None


def client_rng(seed: int, round_: int, client: str) -> np.random.Generator:
    """The random stream of one client in one round, independent of where it runs."""
    # A stable integer for any client id: Python's hash() is salted per process.
    tag = int.from_bytes(hashlib.sha256(str(client).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(round_), tag])


def round_lr(lr: float | Callable[[int], float], round_: int) -> float:
    """The client learning rate of a round: a constant or a schedule evaluated at the round."""
    return float(lr(round_)) if callable(lr) else float(lr)


def local_train(model: Model, params: np.ndarray, X: np.ndarray, y: np.ndarray, *,
                epochs: int, batch_size: int, lr: float, rng: np.random.Generator,
                mu: float = 0.0, control: tuple[np.ndarray, np.ndarray] | None = None,
                optimizer: Optimizer | None = None) -> LocalResult:
    """E epochs of mini-batch steps of ``optimizer`` from the global params on one client's rows.

    Parameters
    ----------
    model : Model
        The model; its ``loss_and_grad`` returns sums, divided here by the batch size.
    params : ndarray
        Global parameters received this round (not modified).
    X, y : ndarray
        The client's training rows.
    epochs, batch_size : int
        Local epochs and mini-batch size (a batch at least ``len(y)`` is full-batch GD, rows in
        stored order).
    lr : float
        Client step size for this round (see :func:`round_lr`) of the default ``sgd``; SCAFFOLD
        also divides by it.
    rng : numpy.random.Generator
        Source of the batch order (see :func:`client_rng`).
    mu : float
        FedProx proximal weight: adds ``mu * (w - params)`` to every gradient.
    control : (ndarray, ndarray), optional
        SCAFFOLD ``(c, c_i)``: server and client control variates; adds ``c - c_i`` to every
        gradient and returns the new ``c_i`` (option II of the paper, which assumes SGD).
    optimizer : Optimizer, optional
        The client's local optimizer, its state started from ``init`` every round (a client's
        optimizer state does not outlive the round); default ``sgd(lr)``.

    Returns
    -------
    LocalResult

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (ClientUpdate). Li et al., "Federated Optimization in Heterogeneous Networks",
    MLSys 2020 (FedProx). Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML 2020 (Algorithm 1, option II).
    """
    n = len(y)
    w = np.array(params, dtype=np.float64, copy=True)
    correction = None if control is None else control[0] - control[1]
    opt_state = None if optimizer is None else optimizer.init(w)
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(epochs):
        # Full-batch GD keeps stored row order so it equals data-parallel gradient descent.
        order = None if batch_size >= n else rng.permutation(n)
        Xe, ye = (X, y) if order is None else (X[order], y[order])
        for start in range(0, n, batch_size):
            batch_loss, grad_sum, nb = model.loss_and_grad(w, Xe[start:start + batch_size],
                                                           ye[start:start + batch_size])
            grad = grad_sum / nb + model.penalty(w)[1]
            if mu:
                grad += mu * (w - params)
            if correction is not None:
                grad += correction
            if optimizer is None:  # sgd(lr), the same bits without its ~4 us a step
                w -= lr * grad
            else:
                updates, opt_state = optimizer.update(grad, opt_state, w)
                w += updates
            steps, loss_sum, seen = steps + 1, loss_sum + batch_loss, seen + nb
    delta = w - params
    packet: Packet = {"delta": delta, "n": np.asarray(float(n))}
    new_control = None
    if control is not None:
        # c_i+ = c_i - c + (x - y_i) / (K * lr): the client's drift estimate of this round.
        new_control = control[1] - control[0] - delta / (max(steps, 1) * lr)
        packet["control"] = new_control - control[1]
    metrics = {"train_loss": loss_sum / max(seen, 1), "n": float(n), "steps": float(steps)}
    return LocalResult(packet, metrics, new_control)

