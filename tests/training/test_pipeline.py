import numpy as np
import pytest
import torch

from pneumoscope.metrics.classification import calibrated_probability
from pneumoscope.models.classifier import Head
from pneumoscope.training.head import class_weights, fit_head, head_logits


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
    prob = calibrated_probability(head_logits(head, xv))
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy(
            torch.as_tensor(prob, dtype=torch.float32), torch.as_tensor(yv, dtype=torch.float32)
        )
    assert float(loss) == pytest.approx(history[best - 1]["val_loss"], rel=1e-4)  # best weights were restored
    assert ((prob >= 0.5) == yv).mean() > 0.9


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0] * 25 + [1] * 75))
    assert w[0] * 25 == pytest.approx(w[1] * 75) and w[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="every class"):
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

    from pneumoscope.cli.main import main
    from pneumoscope.inference.predictor import Predictor
    from tests.conftest import make_kaggle_tree

    data = make_kaggle_tree(tmp_path / "data", n_patients=10)
    run, onnx = tmp_path / "run", tmp_path / "model.onnx"
    flags = [
        "--pretrained",
        "none",
        "--epochs",
        "3",
        "--val-fraction",
        "0.3",
        "--workers",
        "0",
        "--set",
        "hidden=8",
        "--set",
        "head_folds=1",
    ]  # one head per member (the default's five folds would stack five such pairs)
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


def test_average_heads_gives_the_mean_of_the_heads_logits():
    from pneumoscope.models.classifier import average_heads

    torch.manual_seed(0)
    heads = [Head(8, hidden=4).eval() for _ in range(3)]
    x = torch.randn(5, 8)
    mean = torch.stack([h(x) for h in heads]).mean(0)
    packed = average_heads(heads)
    assert packed.fc1.out_features == 12 and torch.allclose(packed(x), mean, atol=1e-6)


def test_patient_folds_keep_each_patient_in_one_fold_and_both_classes_in_every_fold():
    from pneumoscope.training.head import patient_folds

    patients = [f"p{i // 3}" for i in range(300)]  # 100 patients, 3 images each
    labels = np.array([int(int(p[1:]) % 4 != 0) for p in patients])  # a quarter of the patients normal
    folds = patient_folds(patients, labels, 5, seed=1)
    assert all(len({f for p2, f in zip(patients, folds, strict=True) if p2 == p}) == 1 for p in set(patients))
    counts = [(folds == k).sum() for k in range(5)]
    assert max(counts) - min(counts) <= 3 and all(set(labels[folds == k]) == {0, 1} for k in range(5))
    assert (patient_folds(patients, labels, 5, seed=1) == folds).all() and not (patient_folds(patients, labels, 5, seed=2) == folds).all()


def test_cross_fitted_heads_ship_their_mean_and_set_the_threshold_on_every_image(tmp_path):
    """`--set head_folds=3`: three heads averaged into the shipped one; temperature and threshold fitted on all the
    train and validation images' out-of-fold logits, and the description says so."""
    import json

    from pneumoscope.cli.main import main
    from pneumoscope.inference.predictor import Predictor
    from tests.conftest import make_kaggle_tree

    data = make_kaggle_tree(tmp_path / "data", n_patients=10)
    run = tmp_path / "run"
    flags = [
        "--pretrained",
        "none",
        "--epochs",
        "3",
        "--val-fraction",
        "0.3",
        "--workers",
        "0",
        "--set",
        "hidden=8",
        "--set",
        "head_folds=3",
    ]
    assert main(["-q", "train", str(data), "--out", str(run), *flags]) == 0
    desc = json.loads((run / "checkpoint.json").read_text())
    assert desc["head"]["hidden"] == 24  # three heads of 8
    assert "out-of-fold logits of all" in desc["threshold_policy"] and "3 cross-fitted heads" in desc["threshold_policy"]
    assert desc["metrics"]["val"]["n"] == 48  # every train and validation image ((10 + 2) patients x 2 classes x 2 images)
    predictor = Predictor.from_checkpoint(run)
    assert (
        0 < predictor.threshold < 1 and np.isfinite(predictor.predict_proba([predictor.read(next((data / "test").rglob("*.jpeg")))])).all()
    )
    from pneumoscope.training.config import TrainConfig

    assert TrainConfig().head_folds == 5 and TrainConfig(finetune={"epochs": 1}).head_folds == 1  # stage 2 refits on one validation split


def test_a_class_with_fewer_patients_than_folds_gets_fewer_folds(tmp_path, caplog):
    import json
    import logging

    from pneumoscope.cli.main import main
    from tests.conftest import make_kaggle_tree

    data = make_kaggle_tree(tmp_path / "data", n_patients=1, test=False)  # 1 + 2 (val folder) patients of each class
    with caplog.at_level(logging.WARNING, logger="pneumoscope"):
        assert (
            main(
                [
                    "-q",
                    "train",
                    str(data),
                    "--out",
                    str(tmp_path / "run"),
                    "--pretrained",
                    "none",
                    "--epochs",
                    "2",
                    "--val-fraction",
                    "0.4",
                    "--workers",
                    "0",
                    "--set",
                    "hidden=8",
                ]
            )
            == 0
        )
    assert caplog.text.count("only 3 patients; cross-fitting 3 heads") == 1  # said once
    desc = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert desc["head"]["hidden"] == 24 and "3 cross-fitted heads" in desc["threshold_policy"]


@pytest.mark.slow
def test_an_ensemble_backbone_with_cross_fitted_heads_averages_the_packed_heads(tmp_path):
    import json

    from pneumoscope.cli.main import main
    from pneumoscope.inference.predictor import Predictor
    from tests.conftest import make_kaggle_tree

    data = make_kaggle_tree(tmp_path / "data", n_patients=10)
    flags = [
        "--pretrained",
        "none",
        "--epochs",
        "2",
        "--val-fraction",
        "0.3",
        "--workers",
        "0",
        "--set",
        "hidden=8",
        "--set",
        "head_folds=2",
    ]
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "run"), "--backbone", "efficientnet_lite0+2", *flags]) == 0
    desc = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert desc["head"]["hidden"] == 32 and "2 cross-fitted heads" in desc["threshold_policy"]  # 2 folds x 2 members x 8
    predictor = Predictor.from_checkpoint(tmp_path / "run")
    assert np.isfinite(predictor.predict_proba([predictor.read(next((data / "test").rglob("*.jpeg")))])).all()
