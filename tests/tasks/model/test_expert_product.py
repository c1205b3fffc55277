"""The product of experts in numpy: its weight fit, and that it runs without Keras; the package's import isolation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tasks.model.expert_product import fit_expert_weights, log_loss, product_probabilities

REPO = Path(__file__).resolve().parents[3]


def test_expert_weights_are_fitted_on_validation_loss():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    logits = rng.normal(0, 1, size=(400, 4))
    logits[np.arange(400), labels] += 1.0
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    sharp = np.exp(6 * logits) / np.exp(6 * logits).sum(1, keepdims=True)  # right as often, far too sure of itself
    noise = rng.dirichlet(np.ones(4), size=400)
    experts = np.stack([sharp, noise, calibrated], axis=1)

    weights, loss = fit_expert_weights(experts, labels)
    assert loss == pytest.approx(log_loss(product_probabilities(experts, weights), labels))
    assert weights[1] < 0.05, "an uninformative expert gets (almost) no weight"
    assert weights[0] < 0.5 * weights[2], "an over-confident expert is damped, not trusted"
    # The convex optimum: no point of a fine grid over [0, 4]^3 does better.
    grid = np.stack(np.meshgrid(*[np.linspace(0, 4, 21)] * 3), -1).reshape(-1, 3)
    best_on_grid = min(log_loss(product_probabilities(experts, w), labels) for w in grid)
    assert loss <= best_on_grid + 1e-6

    separable = np.stack([calibrated, calibrated], axis=1)
    weights, _ = fit_expert_weights(separable, calibrated.argmax(1), max_weight=4.0)
    np.testing.assert_allclose(weights, [4.0, 4.0], err_msg="sharpening is bounded when the slice is separable")
    combined = product_probabilities(np.stack([calibrated, calibrated], axis=1), np.array([0.5, 0.5]))
    np.testing.assert_allclose(combined, calibrated, rtol=1e-6)


def test_a_single_expert_gets_weight_one_and_its_own_loss():
    probs = np.array([[[0.7, 0.3]], [[0.2, 0.8]]])
    weights, loss = fit_expert_weights(probs, np.array([0, 1]))
    np.testing.assert_array_equal(weights, [1.0])
    assert loss == pytest.approx(-np.mean(np.log([0.7, 0.8])))


NO_KERAS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tasks.model
    from tasks.model import fit_expert_weights
    from tasks.model.expert_product import product_probabilities
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(50, 2))
    weights, loss = fit_expert_weights(probs, np.zeros(50, dtype=int))
    assert product_probabilities(probs, weights).shape == (50, 3)
    assert "keras" not in sys.modules and "tensorflow" not in sys.modules, sorted(sys.modules)
    print("ok")
    """
)


def test_the_product_of_experts_imports_no_keras():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", NO_KERAS], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert child.returncode == 0 and "ok" in child.stdout, child.stderr[-3000:]


ISOLATED = textwrap.dedent(
    """
    import sys
    import tasks.model.batches, tasks.model.errors, tasks.model.layers, tasks.model.model, tasks.model.training
    from tasks.model import fit_classifier, load_model, predict_proba
    outside = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "storage", "flows", "pydantic")
                     or (m.startswith("tasks.") and not m.startswith("tasks.model")))
    assert not outside, outside
    print("ok")
    """
)


def test_the_model_package_imports_neither_prefect_nor_storage():
    """A GPU machine with only keras + numpy can train: nothing in tasks/model reaches the pipeline."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", ISOLATED], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert child.returncode == 0 and "ok" in child.stdout, child.stderr[-3000:]
