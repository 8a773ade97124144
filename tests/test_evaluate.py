"""Metrics are right on known cases, and SWAG averaging beats the SGD point estimate at small
scale."""

import numpy as np
import pytest

from nvmlib.paper.data import load
from nvmlib.paper.evaluate import accuracy, auroc, brier, ece, entropy, evaluate, nll, rotate
from nvmlib.paper.train import TrainConfig, train


def test_metrics_on_known_cases():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy(probs, labels) == 0.75
    assert nll(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.5])))
    assert brier(probs, labels) == pytest.approx(np.mean([0.02, 0.08, 0.72, 0.5]))
    # bins: 0.9 right, 0.8 right, 0.6 wrong, 0.5 right (argmax picks class 0)
    assert ece(probs, labels) == pytest.approx((0.1 + 0.2 + 0.6 + 0.5) / 4)
    assert entropy(np.array([[0.5, 0.5]]))[0] == pytest.approx(np.log(2))
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.1, 0.5]), np.array([0.5, 0.1])) == 0.5


def test_rotation_by_zero_is_identity_and_180_flips():
    test = load("mnist", "test", limit=3)
    x = test.tensors()[0]
    assert np.allclose(rotate(test, 0).numpy(), x.numpy(), atol=1e-5)
    assert np.allclose(rotate(test, 180).numpy(), x.flip(-1).flip(-2).numpy(), atol=1e-4)


def test_swag_beats_sgd_on_nll_and_ece_with_a_fixed_seed():
    """model_2fc overfits 1,000 examples in 30 epochs; SWAG collected over the last 20 calibrates
    it."""
    run = train(
        TrainConfig(
            "model_2fc", epochs=30, limit=1000, lr=0.1, swag_start=10, seed=0, progress=False
        )
    )
    result = evaluate(
        run.model,
        run.posterior,
        load("mnist", "test", limit=5000),
        load("fashion", "test"),
        samples=10,
        seed=0,
        angles=(0, 90),
    )
    run.close()
    table = result.table()
    assert table.loc["SWAG", "nll"] < table.loc["SGD", "nll"]
    assert table.loc["SWAG", "ece"] < table.loc["SGD", "ece"]
    assert set(result.metrics.angle) == {0.0, 90.0} and len(result.ood) == 3
    assert (result.ood.auroc > 0.5).all()
