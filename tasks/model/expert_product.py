"""The product of experts in numpy (no Keras): its probabilities and the fit of its weights.

The classifier's output is softmax(sum_e w_e log p_e): a weighted product of the experts' class
probabilities (the ExpertProduct layer computes the same in Keras). The weights are fitted here,
on the validation slice, after every epoch.
"""

from __future__ import annotations

import numpy as np

_FLOOR = 1e-7  # probabilities are clipped to [_FLOOR, 1] before the log, as in the ExpertProduct layer


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true labels; probs: (documents, classes)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], _FLOOR, 1.0))))


def product_probabilities(expert_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """softmax(sum_e w_e log p_e): (documents, experts, classes) -> (documents, classes)."""
    z = np.einsum("dec,e->dc", np.log(np.clip(expert_probs, _FLOOR, 1.0)), weights)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def fit_expert_weights(expert_probs: np.ndarray, labels: np.ndarray, max_weight: float = 4.0,
                       iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weights w in [0, max_weight] minimising the log-loss of softmax(sum_e w_e log p_e) on (expert_probs, labels).

    A weighted sum of the experts' log-probabilities is a logistic regression with one feature per
    expert, so the loss is convex in w: projected Newton steps (a gradient step when Newton's does
    not help) find its minimum in a few iterations. The weights do not have to sum to 1: their sum
    sets how sharp the product is and their ratios how much each expert counts, and fitting both
    lets an over-confident expert get a small weight without blunting the product. `max_weight`
    bounds the sharpening when the validation slice is separable.
    Log-loss rather than accuracy: on a validation slice of ~1,000 documents accuracy moves in
    steps of single documents. Returns (weights, loss). expert_probs: (documents, experts, classes).
    """
    logs = np.log(np.clip(expert_probs.astype(np.float64), _FLOOR, 1.0))
    n = logs.shape[1]
    if n == 1:
        return np.ones(1, dtype=np.float32), log_loss(expert_probs[:, 0], labels)
    true = logs[np.arange(len(labels)), :, labels]  # (documents, experts): log p_e(label)
    weights = np.full(n, 1.0 / n)
    loss = log_loss(product_probabilities(expert_probs, weights), labels)
    for _ in range(iterations):
        p = product_probabilities(expert_probs, weights)
        expected = np.einsum("dc,dec->de", p, logs)
        gradient = (expected - true).mean(axis=0)
        centred = logs - expected[:, :, None]
        hessian = np.einsum("dc,dec,dfc->ef", p, centred, centred) / len(labels)
        newton = np.linalg.solve(hessian + 1e-9 * np.eye(n), gradient)
        step = _first_improving_step(expert_probs, labels, weights, loss, (newton, gradient), max_weight)
        if step is None:
            break
        weights, loss = step
    return weights.astype(np.float32), loss


def _first_improving_step(expert_probs, labels, weights, loss, directions, max_weight):
    """(weights, loss) after a halving line search along the first direction that lowers the loss; None if none does."""
    for direction in directions:
        step = 1.0
        while step > 1e-6:
            candidate = np.clip(weights - step * direction, 0.0, max_weight)
            candidate_loss = log_loss(product_probabilities(expert_probs, candidate), labels)
            if candidate_loss < loss - 1e-9:
                return candidate, candidate_loss
            step /= 2
    return None
