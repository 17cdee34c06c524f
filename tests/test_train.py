import numpy as np
import pytest
import torch

from pneumoscope.models import Head
from pneumoscope.train import class_weights, fit_head, predict_head


def _blobs(rng, n, shift):
    y = (rng.uniform(size=n) < 0.75).astype(int)  # imbalanced like the data
    x = rng.standard_normal((n, 8)).astype(np.float32) + shift * y[:, None]
    return x, y


def test_head_learns_separable_features_and_restores_best_epoch():
    rng = np.random.default_rng(0)
    xt, yt = _blobs(rng, 400, 2.0)
    xv, yv = _blobs(rng, 100, 2.0)
    torch.manual_seed(0)  # the head's initial weights: the same whichever tests ran before in this process
    head = Head(8, hidden=16, dropout=0.1)
    history, best = fit_head(head, xt, yt, xv, yv, epochs=200, patience=5, lr=1e-2, progress=False)
    assert len(history) < 200  # early stopping fired
    assert best == min(history, key=lambda h: h["val_loss"])["epoch"]
    assert len(history) == best + 5
    prob = predict_head(head, xv)
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy(torch.as_tensor(prob, dtype=torch.float32), torch.as_tensor(yv, dtype=torch.float32))
    assert float(loss) == pytest.approx(history[best - 1]["val_loss"], rel=1e-4)  # best weights were restored
    assert ((prob >= 0.5) == yv).mean() > 0.9


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0] * 25 + [1] * 75))
    assert w[0] * 25 == pytest.approx(w[1] * 75) and w[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="both classes"):
        class_weights(np.ones(5))


def test_fit_head_is_reproducible():
    rng = np.random.default_rng(1)
    xt, yt = _blobs(rng, 200, 1.0)
    xv, yv = _blobs(rng, 50, 1.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        head = Head(8, hidden=8)
        h, _ = fit_head(head, xt, yt, xv, yv, epochs=5, patience=5, seed=7, progress=False)
        runs.append([r["val_loss"] for r in h])
    assert runs[0] == runs[1]
