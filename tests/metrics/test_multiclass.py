"""N-class metrics (issue 22): checked against scikit-learn and against hand counts."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscope.metrics.classification import compute_roc_auc
from pneumoscope.metrics.multiclass import (
    check_multiclass,
    compare_macro_auc,
    compute_multiclass_metrics,
    confusion_matrix,
    fit_temperature_multiclass,
    softmax,
)


def _three_class(n=300, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    groups = np.array([f"p{i // 2}" for i in range(n)])  # two images a patient
    y = np.array([y[i - i % 2] for i in range(n)])  # ... of one class
    logits[np.arange(n), y] += 0.5
    return y, softmax(logits), groups


def test_the_table_matches_scikit_learn_and_hand_counts():
    y, p, groups = _three_class()
    m = compute_multiclass_metrics(y, p, ["NORMAL", "BACTERIA", "VIRUS"], groups=groups, n_boot=200)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["micro_auc"] == pytest.approx(roc_auc_score(np.eye(3)[y].ravel(), p.ravel()))
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == len(y) and (cm.sum(1) == np.bincount(y, minlength=3)).all()
    virus = m["per_class"]["VIRUS"]
    tp, fn = ((pred == 2) & (y == 2)).sum(), ((pred != 2) & (y == 2)).sum()
    fp, tn = ((pred == 2) & (y != 2)).sum(), ((pred != 2) & (y != 2)).sum()
    assert virus["sensitivity"] == pytest.approx(tp / (tp + fn)) and virus["specificity"] == pytest.approx(tn / (tn + fp))
    assert virus["ppv"] == pytest.approx(tp / (tp + fp)) and virus["npv"] == pytest.approx(tn / (tn + fn))
    assert virus["roc_auc"] == pytest.approx(roc_auc_score(y == 2, p[:, 2]))
    assert np.allclose(np.array(m["confusion_row_percent"]).sum(1), 100, atol=0.2)
    lo, hi = m["ci95"]["macro_auc"]
    assert lo <= m["macro_auc"] <= hi and hi - lo < 0.2
    lo, hi = m["ci95"]["accuracy"]
    assert lo < m["accuracy"] < hi
    again = compute_multiclass_metrics(y, p, ["NORMAL", "BACTERIA", "VIRUS"], groups=groups, n_boot=200)
    assert again["ci95"] == m["ci95"]  # seeded


def test_two_classes_give_the_binary_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    p1 = np.clip(0.3 * y + rng.uniform(size=100) * 0.7, 0, 1)
    m = compute_multiclass_metrics(y, np.column_stack([1 - p1, p1]), ["NORMAL", "PNEUMONIA"])
    assert m["per_class"]["PNEUMONIA"]["roc_auc"] == pytest.approx(compute_roc_auc(y, p1))
    assert m["macro_auc"] == pytest.approx(compute_roc_auc(y, p1))


def test_a_class_missing_from_the_labels_gives_none_not_a_number():
    y = np.array([0, 0, 1, 1])
    p = softmax(np.eye(3)[[0, 1, 1, 0]] * 2)
    m = compute_multiclass_metrics(y, p, ["A", "B", "C"])
    assert m["per_class"]["C"]["roc_auc"] is None and m["macro_auc"] is None and m["per_class"]["C"]["sensitivity"] is None


@pytest.mark.parametrize(
    "probs,match",
    [
        (np.full((3, 3), 0.5), "sum to 1"),
        (np.array([[np.nan, 0.5, 0.5]] * 3), "finite"),
        (np.full((3, 1), 1.0), "at least 2"),
    ],
)
def test_bad_probabilities_are_refused(probs, match):
    with pytest.raises(ValueError, match=match):
        check_multiclass([0, 1, 0], probs)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="labels must be integers"):
        check_multiclass([0, 3], softmax(np.zeros((2, 3))))


def test_softmax_is_stable_and_the_temperature_is_recovered():
    assert np.isfinite(softmax(np.array([[1000.0, 0.0, -1000.0]]))).all()
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 2
    y = np.array([rng.choice(3, p=row) for row in softmax(true_logits)])
    assert fit_temperature_multiclass(true_logits * 2.0, y) == pytest.approx(2.0, rel=0.1)  # over-confident by 2x


def test_confusion_matrix_rows_are_true_classes():
    assert confusion_matrix([0, 0, 2], [1, 0, 2], 3).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_comparing_a_model_with_itself_finds_no_difference_and_a_better_one_a_positive_one():
    y, p, groups = _three_class(seed=2, signal=0.8)
    same = compare_macro_auc(y, p, p, groups, n_boot=100)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = softmax(np.log(p) + 3 * np.eye(3)[y])
    diff = compare_macro_auc(y, p, better, groups, n_boot=100)
    assert diff["difference"] > 0 and diff["ci95"][0] > 0 and diff["p_value"] < 0.05


# --------------------------------------------------------------------------- a three-class run, every door


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    from pneumoscope.cli.main import main
    from tests.conftest import make_three_class_tree

    root = tmp_path_factory.mktemp("three")
    tree = make_three_class_tree(root / "cx")
    run = root / "run"
    argv = [
        "-q",
        "train",
        str(tree),
        "--out",
        str(run),
        "--classes",
        "auto",
        "--pretrained",
        "none",
        "--epochs",
        "20",
        "--val-fraction",
        "0.3",
    ]
    assert main(argv) == 0
    return tree, run


def test_the_run_describes_its_classes_and_its_screening_decision(three_class):
    import json

    _, run = three_class
    d = json.loads((run / "checkpoint.json").read_text())
    assert d["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"] and d["normal_class"] == "NORMAL" and d["format_version"] == 2
    assert d["head"]["outputs"] == 3 and "softmax" in d["output"] and 0 < d["threshold"] < 1
    val = d["metrics"]["val"]
    assert set(val["multiclass"]["per_class"]) == {"COVID", "NORMAL", "PNEUMONIA"} and val["roc_auc"] is not None


def test_evaluate_reports_the_classes_and_the_screening_view(three_class, tmp_path, capsys):
    import csv
    import json

    from pneumoscope.cli.main import main

    tree, run = three_class
    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", str(run), str(tree), "--out", str(ev), "--bootstraps", "50", "--no-audit"]) == 0
    printed = capsys.readouterr().out
    assert "3 classes" in printed and "macro AUC" in printed and "screening decision" in printed
    m = json.loads((ev / "metrics.json").read_text())
    mc = m["multiclass"]
    assert len(mc["confusion_matrix"]) == 3 and sum(map(sum, mc["confusion_matrix"])) == m["n"] == 24
    rows = list(csv.DictReader(open(ev / "predictions.csv")))
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("COVID", "NORMAL", "PNEUMONIA")]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and float(r["prob"]) == pytest.approx(1 - probs[1], abs=1e-5)
        assert (r["pred_label"] == "NORMAL") == (r["screen"] == "NORMAL")  # the class named never contradicts the screening decision
    html = (ev / "report.html").read_text()
    assert "classes-table" in html and "confusion matrix of the classes" in html and (ev / "confusion_matrix_classes.png").is_file()
    assert "P(pneumonia)" not in html and "P(not normal)" in html  # the gallery names what its probability is of


def test_predict_and_the_api_give_every_class_probability(three_class, capsys):
    import json

    import pneumoscope
    from pneumoscope.cli.main import main

    tree, run = three_class
    images = sorted((tree / "test" / "COVID").glob("*.png"))[:2] + sorted((tree / "test" / "NORMAL").glob("*.png"))[:2]
    assert main(["-q", "predict", str(run), *map(str, images), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        probs = {c: row[f"prob_{c}"] for c in ("COVID", "NORMAL", "PNEUMONIA")}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-6) and row["prob"] == pytest.approx(1 - probs["NORMAL"], abs=1e-6)
        if row["label"] is not None:
            assert (row["label"] == "NORMAL") == (row["prob"] < row["threshold"])
    model = pneumoscope.load(run)
    p = model.predict(images[0])
    assert list(p.probs) == ["COVID", "NORMAL", "PNEUMONIA"] and p.probs == pytest.approx(
        {k: rows[0][f"prob_{k}"] for k in p.probs}, abs=1e-6
    )
    cam = model.explain(images[0])  # the map of the decided class (a softmax target, not the binary sign flip)
    assert cam.cam.shape == (224, 224) and cam.cam.min() >= 0 and cam.cam.max() <= 1


def test_a_task_without_its_normal_class_is_refused_in_one_line(three_class, tmp_path, capsys):
    from pneumoscope.cli.main import main

    tree, _ = three_class
    common = ["train", str(tree), "--classes", "COVID,PNEUMONIA,NORMAL", "--pretrained", "none", "--epochs", "2"]
    assert main([*common, "--out", str(tmp_path / "a"), "--normal-class", "HEALTHY"]) == 2
    assert "normal_class 'HEALTHY' is not one of the classes" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_the_pneumonia_type_task_trains_and_evaluates_with_its_own_labels(kaggle_tree, tmp_path, capsys):
    import json

    from pneumoscope.cli.main import main

    run, ev = tmp_path / "run", tmp_path / "ev"
    argv = ["-q", "train", str(kaggle_tree), "--out", str(run), "--labels", "pneumonia-type", "--pretrained", "none", "--epochs", "5"]
    assert main([*argv, "--val-fraction", "0.3"]) == 0
    d = json.loads((run / "checkpoint.json").read_text())
    assert d["class_names"] == ["NORMAL", "BACTERIA", "VIRUS"] and d["training"]["labels"] == "pneumonia-type"
    assert main(["-q", "evaluate", str(run), str(kaggle_tree), "--out", str(ev), "--bootstraps", "20", "--no-audit"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["multiclass"]["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]


@pytest.mark.slow
def test_explain_runs_its_checks_on_a_three_class_run(three_class, tmp_path):
    import json

    from pneumoscope.cli.main import main

    tree, run = three_class
    images = sorted((tree / "test" / "COVID").glob("*.png"))[:3] + sorted((tree / "test" / "PNEUMONIA").glob("*.png"))[:3]
    out = tmp_path / "ex"
    assert main(["-q", "explain", str(run), *map(str, images), "--out", str(out)]) == 0
    explained = json.loads((out / "explanations.json").read_text())
    assert (out / "scores.csv").is_file() and explained
    # each label is predict's: the normal class below the threshold, else the most probable other class (explain wrote
    # class_names[decision]: COVID for every image below the threshold, NORMAL for every one above)
    import pneumoscope

    predicted = {p.path: p.label for p in pneumoscope.load(run).predict(list(map(str, images)))}
    assert {e["path"]: e["label"] for e in explained["images"]} == {p: lab for p, lab in predicted.items() if lab is not None}
    assert main(["-q", "explain", str(run), str(images[0]), "--out", str(tmp_path / "named"), "--target", "covid", "--no-checks"]) == 0


def test_the_probability_target_of_k_logits_is_the_softmax():
    import torch

    from pneumoscope.explain.cams import ProbabilityTarget

    out = torch.tensor([[2.0, 0.0, -1.0]])
    assert ProbabilityTarget(0)(out).item() == pytest.approx(torch.softmax(out, -1)[0, 0].item())
    assert ProbabilityTarget(1)(torch.tensor([[0.5]])).item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())
    assert ProbabilityTarget(0)(torch.tensor([[0.5]])).item() == pytest.approx(1 - torch.sigmoid(torch.tensor(0.5)).item())


def test_site_commands_work_for_n_classes(three_class, tmp_path, capsys):
    """Issue 22: shift, adapt (features and label shift over K classes) and calibrate (one temperature, the screening
    threshold, and --refit-head) on a three-class run."""
    import json

    import numpy as np

    from pneumoscope.cli.main import main
    from tests.conftest import make_three_class_tree

    tree, run = three_class
    site = tree / "test"
    assert main(["-q", "shift", str(run), str(site), "--json"]) == 0  # the screening view's shift report, and the class priors
    report = json.loads(capsys.readouterr().out)
    assert "domain_auc" in report and report["class_priors"]["classes"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert sum(report["class_priors"]["em"]) == pytest.approx(1) and report["class_priors"]["normal"] == "NORMAL"
    assert "Estimated 'not NORMAL' prevalence" in report["verdict"] and "pneumonia" not in report["verdict"]
    from pneumoscope.adaptation.assess import ClassPriors, ShiftReport
    from tests.conftest import conforms

    conforms(report, ShiftReport)
    conforms(report["class_priors"], ClassPriors)

    assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "c0")]) == 0  # N classes: center by default
    assert json.loads((tmp_path / "c0" / "checkpoint.json").read_text())["adaptation"]["method"] == "center"
    assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "a"), "--method", "center+prior"]) == 0
    before, after = (json.loads((r / "checkpoint.json").read_text()) for r in (run, tmp_path / "a"))
    entry = after["adaptation"]
    assert list(entry["estimated_class_priors"]) == ["COVID", "NORMAL", "PNEUMONIA"] and len(entry["prior_logit_offset"]) == 3
    assert entry["estimated_prevalence"] == pytest.approx(1 - entry["estimated_class_priors"]["NORMAL"])
    from pneumoscope.models.sections import AdaptationSection, CalibrationSection
    from tests.conftest import conforms

    conforms(entry, AdaptationSection)
    moved = np.log(np.clip(list(entry["estimated_class_priors"].values()), 0.01, None))
    assert np.allclose(np.diff(entry["prior_logit_offset"]), np.diff(moved - np.log(report["class_priors"]["validation"])), atol=0.05)
    assert after["threshold"] != before["threshold"] and 0 < after["threshold"] < 1
    assert main(["-q", "adapt", str(run), str(site), "--out", str(tmp_path / "b"), "--method", "center"]) == 0
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["threshold"] == before["threshold"]

    sample = make_three_class_tree(tmp_path / "site", n_patients=6, seed=3) / "train"
    for name, extra in (("c", []), ("d", ["--refit-head"])):
        assert main(["-q", "calibrate", str(run), str(sample), "--split", "all", "--out", str(tmp_path / name), *extra]) == 0
        cal = json.loads((tmp_path / name / "checkpoint.json").read_text())
        assert cal["calibration"]["n_per_class"] == {"COVID": 12, "NORMAL": 12, "PNEUMONIA": 12}
        assert cal["calibration"]["n_positive"] == 24 and "multiclass" in cal["calibration"]["metrics_on_sample"]
        conforms(cal["calibration"], CalibrationSection)
        assert cal["class_names"] == before["class_names"] and 0 < cal["threshold"] < 1
    small = make_three_class_tree(tmp_path / "few", n_patients=2, seed=4) / "train"
    assert main(["-q", "calibrate", str(run), str(small), "--split", "all", "--out", str(tmp_path / "e")]) == 2
    assert "at least 10 distinct images of each class, got COVID 4, NORMAL 4, PNEUMONIA 4" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_two_evaluations_of_a_three_class_task(three_class, tmp_path, capsys):
    import json

    from pneumoscope.cli.main import main

    tree, run = three_class
    evals = []
    for name in ("a", "b"):
        evals.append(tmp_path / name)
        assert main(["-q", "evaluate", str(run), str(tree), "--out", str(evals[-1]), "--bootstraps", "20", "--no-audit"]) == 0
    capsys.readouterr()
    assert main(["-q", "compare", *map(str, evals), "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "3 classes" in printed and "macro AUC" in printed and "screening decision" in printed
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["classes"] == ["COVID", "NORMAL", "PNEUMONIA"] and result["macro_auc"]["difference"] == 0
    assert result["mcnemar_top1"]["only_a_correct"] == 0 and result["auc_delong"]["difference"] == 0


@pytest.mark.slow
def test_an_onnx_export_of_a_three_class_run_gives_the_same_class_probabilities(three_class, tmp_path, capsys):
    import json

    from pneumoscope.cli.main import main

    tree, run = three_class
    images = [str(p) for p in sorted((tree / "test" / "COVID").glob("*.png"))[:2]]
    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(run), "--out", str(out), "--check-images", *images]) == 0
    capsys.readouterr()
    rows = {}
    for model in (run, out):
        assert main(["-q", "predict", str(model), *images, "--format", "json"]) == 0
        rows[model] = json.loads(capsys.readouterr().out)
    for a, b in zip(rows[run], rows[out], strict=True):
        for c in ("COVID", "NORMAL", "PNEUMONIA"):
            assert a[f"prob_{c}"] == pytest.approx(b[f"prob_{c}"], abs=1e-4)
        assert a["label"] == b["label"]


def test_data_inspect_counts_images_and_patients_per_class(tmp_path, capsys):
    import json

    from pneumoscope.cli.main import main
    from tests.conftest import make_three_class_tree

    tree = make_three_class_tree(tmp_path / "cx", n_patients=3, per_patient=2)
    assert main(["data", "inspect", str(tree), "--classes", "auto"]) == 0
    text = capsys.readouterr().out
    assert "COVID" in text and "images (patients) a class" in text and "leakage check: OK" in text
    assert main(["data", "inspect", str(tree), "--classes", "auto", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert sum(sp["classes"]["COVID"] for sp in summary["splits"].values()) == 2 * (3 + 3 + 4)
