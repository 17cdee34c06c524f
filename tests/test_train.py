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


@pytest.mark.slow
def test_an_ensemble_trains_one_head_per_member_and_ships_as_one_checkpoint_and_one_onnx(tmp_path):
    """`--backbone efficientnet_lite0+2`: each member's head fitted on its own features, packed
    into one head (mean logit); the run predicts, and exports to one ONNX file that agrees."""
    import json

    from pneumoscope.cli import main
    from pneumoscope.predict import Predictor
    from tests.conftest import make_kaggle_tree

    data = make_kaggle_tree(tmp_path / "data", n_patients=10)
    run, onnx = tmp_path / "run", tmp_path / "model.onnx"
    flags = ["--pretrained", "none", "--epochs", "3", "--val-fraction", "0.3", "--workers", "0", "--set", "hidden=8"]
    assert main(["-q", "train", str(data), "--out", str(run), "--backbone", "efficientnet_lite0+2", *flags]) == 0
    desc = json.loads((run / "checkpoint.json").read_text())
    assert desc["backbone"] == "efficientnet_lite0+2"
    assert desc["head"]["in_features"] == 2560 and desc["head"]["hidden"] == 16  # two heads of 8, packed
    predictor = Predictor.from_checkpoint(run)
    fc1 = predictor.model.head.fc1.weight
    assert fc1[:8, 1280:].abs().max() == 0 and fc1[8:, :1280].abs().max() == 0  # each member's head sees its own features
    images = sorted(str(p) for p in (data / "test").rglob("*.jpeg"))[:3]
    assert main(["-q", "export", str(run), "--out", str(onnx), "--check-images", *images]) == 0
    decoded = [predictor.read(p) for p in images]
    np.testing.assert_allclose(Predictor.from_onnx(onnx).run(decoded)[0], predictor.run(decoded)[0], atol=1e-4)
